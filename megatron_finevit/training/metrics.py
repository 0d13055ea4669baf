"""Throughput and utilisation: samples/s, tokens/s, achieved TFLOP/s and MFU, the time a step
waited for its data, plus the sinks (stdout lines with units, TensorBoard, an optional progress
bar)."""

from __future__ import annotations

import logging
import sys
import time

import torch

log = logging.getLogger(__name__)

# Dense bf16 tensor-core peaks (TFLOP/s per GPU), by a substring of torch.cuda.get_device_name().
GPU_BF16_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}


def measure_gemm_tflops(size: int = 1024, repeats: int = 5, dtype=torch.float32) -> float:
    """This machine's large-GEMM rate: the physical limit a CPU run is measured against."""
    # Its own generator: the trainer calls this after a resume restored torch's random stream.
    generator = torch.Generator().manual_seed(0)
    a, b = (torch.randn(size, size, dtype=dtype, generator=generator) for _ in range(2))
    a @ b  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e12


def peak_tflops(configured: float | None) -> float:
    if configured:
        return configured
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for key, value in GPU_BF16_PEAK_TFLOPS.items():
            if key in name:
                return value
        log.warning("unknown GPU %r: set logging.peak_tflops for MFU; using 989", name)
        return 989.0
    return measure_gemm_tflops()


class Throughput:
    """Accumulates work between log lines; ``rates()`` returns per-second figures."""

    def __init__(self, world_size: int, peak_tflops_per_device: float):
        self.world_size = world_size
        self.peak = peak_tflops_per_device
        self.reset()

    def reset(self) -> None:
        self.samples = self.tokens = self.flops = 0.0
        self.counts: dict[str, float] = {}
        self.start = time.perf_counter()

    def add(self, samples: float, tokens: float, flops: float, **counts: float) -> None:
        """Global (all-rank) work done in one step; ``counts`` are further token counts a stage
        reports (e.g. ``image_tokens``, ``text_tokens``), each logged as ``<name>_per_s``."""
        self.samples += samples
        self.tokens += tokens
        self.flops += flops
        for name, count in counts.items():
            self.counts[name] = self.counts.get(name, 0.0) + count

    def rates(self) -> dict[str, float]:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        tflops_per_device = self.flops / elapsed / 1e12 / self.world_size
        return {"samples_per_s": self.samples / elapsed, "tokens_per_s": self.tokens / elapsed,
                **{f"{name}_per_s": count / elapsed for name, count in self.counts.items()},
                "tflops_per_device": tflops_per_device, "mfu": tflops_per_device / self.peak}


class DataWaitTimer:
    """The trainer's data iterator, counting the time the step is blocked on it: inside
    ``next()`` (megatron's schedule pulls each micro-batch there) plus what the data reports as
    ``prepare_wait_s`` (loaders that load a step's micro-batches before the schedule, as the
    packed loader does under pipeline parallelism). Resume state and ``close`` pass through."""

    def __init__(self, data):
        self.data = data
        self._next_s = 0.0
        self._prepare_seen = self._prepare_total()

    def _prepare_total(self) -> float:
        return getattr(self.data, "prepare_wait_s", 0.0)

    def __iter__(self):
        return self

    def __next__(self):
        start = time.perf_counter()
        try:
            return next(self.data)
        finally:
            self._next_s += time.perf_counter() - start

    def take_wait_s(self) -> float:
        """Seconds blocked on data since the last call."""
        prepare = self._prepare_total()
        waited = self._next_s + prepare - self._prepare_seen
        self._next_s, self._prepare_seen = 0.0, prepare
        return waited

    def state_dict(self) -> dict:
        return self.data.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.data.load_state_dict(state)

    def close(self) -> None:
        """Stop the data's workers, if it has any."""
        if hasattr(self.data, "close"):
            self.data.close()


def data_wait_metrics(wait_s: float, step_time_s: float) -> dict[str, float]:
    """``data_wait_s`` and ``data_wait``, its fraction of the step. ``wait_s`` is the slowest
    rank's (every rank waits for it at the gradient reduction) and ``step_time_s`` the logging
    rank's: the two clocks can differ by the skew between the ranks' step starts, hence the
    clamp to 1."""
    return {"data_wait_s": wait_s, "data_wait": min(1.0, wait_s / max(step_time_s, 1e-9))}


class MetricsSink:
    """Rank 0 writes: one stdout line per log interval (with units), TensorBoard scalars, and a
    tqdm bar when stdout is a terminal."""

    def __init__(self, enabled: bool, total_steps: int, tensorboard_dir: str | None,
                 progress_bar: bool | None):
        self.enabled = enabled
        self.writer = None
        self.bar = None
        if not enabled:
            return
        if tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(tensorboard_dir)
        if progress_bar if progress_bar is not None else sys.stdout.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, unit="step", dynamic_ncols=True)

    def step(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        if self.writer:
            for key, value in values.items():
                self.writer.add_scalar(key, value, step)
        line = format_line(step, values)
        if self.bar:
            self.bar.n = step
            self.bar.set_postfix_str(line.split("|", 1)[-1].strip()[:120], refresh=True)
        print(line, flush=True)

    def text(self, message: str) -> None:
        if self.enabled:
            (self.bar.write if self.bar else print)(message)

    def close(self) -> None:
        if self.writer:
            self.writer.close()
        if self.bar:
            self.bar.close()


# the loss in full (shortest round-trip repr): two runs' logs compare bit for bit (exact resume)
_UNITS = {"loss": ("loss", "{!r}"), "lr": ("lr", "{:.3e}"), "grad_norm": ("grad norm", "{:.3f}"),
          "samples_per_s": ("samples/s", "{:,.1f}"), "tokens_per_s": ("tokens/s", "{:,.0f}"),
          "image_tokens_per_s": ("image tokens/s", "{:,.0f}"),
          "text_tokens_per_s": ("text tokens/s", "{:,.0f}"),
          "tflops_per_device": ("TFLOP/s/device", "{:.3f}"), "mfu": ("MFU", "{:.2%}"),
          "step_time_s": ("s/step", "{:.3f}"), "data_wait_s": ("data wait s/step", "{:.3f}"),
          "data_wait": ("data_wait", "{:.3f}")}


def format_line(step: int, values: dict[str, float]) -> str:
    parts = [f"step {step:6d}"]
    for key, value in values.items():
        label, fmt = _UNITS.get(key, (key, "{:.4f}"))
        parts.append(f"{label} {fmt.format(value)}")
    return " | ".join(parts)
