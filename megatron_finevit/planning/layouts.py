"""Parallel layouts of a ``Workload`` on a cluster: memory per GPU, step time, ranking.

Step time model (per optimiser step, every GPU busy with its share):

* compute ``t_c = step FLOPs / (world · peak · mfu)`` (``mfu``: the trainer's MFU, model FLOPs;
  a frozen teacher's forward and Stage II's ``loss_scope: step`` embedding pass are work done at
  the same rate); full recompute adds one forward of the layers: ``× 4/3``;
* pipeline bubble (1F1B): ``t / (1 − (pp−1)/(m+pp−1))``, ``m`` micro-batches per rank a step;
* TP: per layer and micro-batch 2 all-reduces forward and 2 backward (sequence parallelism's
  all-gather + reduce-scatter move the same bytes) of ``tokens · h · 2 B`` each, ring cost
  ``2(tp−1)/tp`` of it per GPU, not overlapped; 3 forward passes' worth under recompute;
* CP (our all-gather attention): per layer K and V all-gathered forward and their gradients
  reduce-scattered backward, ``(cp−1)/cp · tokens · 2·kv · 2 B`` each way, not overlapped;
* DP: gradients reduce-scattered (fp32) and weights all-gathered (bf16) once a step,
  ``(dp−1)/dp · 6 B`` per local parameter, overlapped with the backward except what exceeds half
  the compute time.

Links: within a node (``tp · cp ≤ gpus per node``) NVLink, else the per-GPU network; DP always
the network. Memory per GPU (``planning.memory``) is the first pipeline stage's (it holds the ViT
and the most micro-batches in flight, ``min(pp, m)``) and must fit ``FIT_FRACTION`` of the GPU
(the rest: CUDA context, NCCL and allocator fragmentation).
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_finevit.planning.memory import layer_activation_bytes, state_bytes
from megatron_finevit.planning.workload import Phase, Workload

FIT_FRACTION = 0.85
GIB = 2 ** 30


@dataclass(frozen=True)
class GPU:
    """Dense bf16 peak (TFLOP/s), memory (GiB), NVLink and network bandwidth per GPU (GB/s, one
    direction)."""

    name: str
    peak_tflops: float
    memory_gib: float
    nvlink_gbps: float
    network_gbps: float


GPUS = {"h100": GPU("h100", 989.0, 80, 450, 50),
        "h200": GPU("h200", 989.0, 141, 450, 50),
        "a100": GPU("a100", 312.0, 80, 300, 25)}


@dataclass(frozen=True)
class Layout:
    tp: int
    pp: int
    cp: int
    dp: int
    recompute: bool

    @property
    def label(self) -> str:
        return (f"tp{self.tp}_pp{self.pp}_cp{self.cp}_dp{self.dp}"
                + ("_recompute" if self.recompute else ""))


@dataclass(frozen=True)
class Estimate:
    layout: Layout
    memory: dict            # bytes per GPU: weights, grads, optimizer, frozen, activations
    step_seconds: float     # mean over the stage's steps
    samples_per_second: float
    fits: bool

    @property
    def memory_total(self) -> float:
        return sum(self.memory.values())


def activation_bytes(workload: Workload, phase: Phase, layout: Layout, in_flight: float) -> float:
    """First pipeline stage: its share of each stack's layers, ``in_flight`` micro-batches;
    with full recompute each layer keeps its input and one layer is recomputed at a time."""
    total, largest = 0.0, 0.0
    for stack in phase.stacks:
        layers = stack.layers / layout.pp if stack.pipelined else stack.layers
        tokens = stack.tokens / layout.cp
        one = layer_activation_bytes(stack.shape, tokens, 2, layout.tp, layout.tp > 1)
        if layout.recompute:
            total += layers * tokens * stack.shape.hidden * 2 / (layout.tp if layout.tp > 1 else 1)
            largest = max(largest, one)
        else:
            total += layers * one
    return total * in_flight + largest + workload.logits_bytes / (layout.tp * layout.cp)


def memory_bytes(workload: Workload, layout: Layout, micro_batches_per_rank: float) -> dict:
    unpipelined = workload.trained_params - workload.pipelined_params
    local = (unpipelined + workload.pipelined_params / layout.pp) / layout.tp
    state = state_bytes(local, workload.frozen_params, 1, layout.dp * layout.cp)
    in_flight = min(layout.pp, max(micro_batches_per_rank, 1))
    activations = max(activation_bytes(workload, phase, layout, in_flight)
                      for phase in workload.phases)
    return {"weights": state.weights, "grads": state.grads, "optimizer": state.optimizer,
            "frozen": state.frozen, "activations": activations}


def estimate(workload: Workload, layout: Layout, gpu: GPU, gpus_per_node: int,
             mfu: float) -> Estimate:
    world = layout.tp * layout.pp * layout.cp * layout.dp
    peak = gpu.peak_tflops * 1e12
    intra = layout.tp * layout.cp <= gpus_per_node
    link = (gpu.nvlink_gbps if intra else gpu.network_gbps) * 1e9
    seconds, samples = 0.0, 0.0
    micro = sum(p.micro_batches for p in workload.phases)
    for phase in workload.phases:
        work = phase.samples * (phase.flops_per_sample + phase.teacher_flops_per_sample)
        compute = work / (world * peak * mfu) * (4 / 3 if layout.recompute else 1.0)
        compute += phase.samples * phase.extra_forward_flops_per_sample / (world * peak * mfu)
        comm = 0.0  # per micro-batch on one rank
        for stack in phase.stacks:
            layers = stack.layers / layout.pp if stack.pipelined else stack.layers
            passes = (3 if layout.recompute else 2) + (phase.extra_forward_flops_per_sample > 0)
            if layout.tp > 1:
                volume = stack.tokens / layout.cp * stack.shape.hidden * 2
                comm += passes * 2 * layers * volume * 2 * (layout.tp - 1) / layout.tp / link
            if layout.cp > 1 and stack.pipelined:
                volume = stack.tokens / layout.cp * 2 * stack.shape.kv_width * 2
                comm += passes * layers * volume * (layout.cp - 1) / layout.tp / link
        seconds += compute + comm * phase.micro_batches / layout.dp
        samples += phase.samples
    steps = sum(p.details.get("phase_steps", 0) for p in workload.phases) or 1
    m_rank = micro / steps / layout.dp
    bubble = (layout.pp - 1) / (m_rank + layout.pp - 1)
    seconds /= (1 - bubble)
    local = ((workload.trained_params - workload.pipelined_params)
             + workload.pipelined_params / layout.pp) / layout.tp
    dp_time = steps * (layout.dp - 1) / layout.dp * 6 * local / (gpu.network_gbps * 1e9)
    seconds += max(0.0, dp_time - 0.5 * seconds)
    memory = memory_bytes(workload, layout, m_rank)
    fits = sum(memory.values()) <= FIT_FRACTION * gpu.memory_gib * GIB
    return Estimate(layout, memory, seconds / steps, samples / seconds, fits)


def candidate_layouts(workload: Workload, world: int, gpus_per_node: int) -> list[Layout]:
    """TP within a node dividing every TP-split size, PP dividing ``pp_layers``, CP up to 8;
    DP the rest; recompute on or off."""
    layouts = []
    for tp in (1, 2, 4, 8):
        if tp > gpus_per_node or any(size % tp for size in workload.tp_divisors):
            continue
        for pp in (1, 2, 4, 7, 8, 14, 16):
            if workload.pp_layers % pp:
                continue
            for cp in (1, 2, 4, 8):
                if world % (tp * pp * cp):
                    continue
                for recompute in (False, True):
                    layouts.append(Layout(tp, pp, cp, world // (tp * pp * cp), recompute))
    return layouts


def rank_layouts(workload: Workload, world: int, gpu: GPU, gpus_per_node: int,
                 mfu: float) -> list[Estimate]:
    """Layouts that fit, fastest first."""
    estimates = [estimate(workload, layout, gpu, gpus_per_node, mfu)
                 for layout in candidate_layouts(workload, world, gpus_per_node)]
    return sorted((e for e in estimates if e.fits), key=lambda e: -e.samples_per_second)
