"""A tiny language-model stage for testing the training loop itself (checkpoints, exact resume,
resharding, signals, non-finite-loss skipping) without the cost of the real stages.

The model is the tiny Qwen3-like GPT of ``testing/gpt_parity``; the data is a learnable token
sequence (t[i+1] = 5·t[i] + 3 mod vocab) drawn from a per-DP-rank generator whose state is the
data loader's resumable position. Two options make a resume harder to get right: ``dropout``
(the forward draws from torch's RNG and megatron's tracker, so a resume must restore both) and
``param_groups`` (named optimiser groups with their own learning rate or frozen for a while, as a
Stage III's ViT / projector / LLM groups).
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from megatron_finevit.config.loader import from_dict
from megatron_finevit.config.train import TrainConfig
from megatron_finevit.testing.gpt_parity import RunConfig, tiny_qwen3


def learnable_batch(seq_length: int, batch: int, vocab: int, generator: torch.Generator):
    """[batch, seq] tokens and next-token labels of the sequence t[i+1] = (5 t[i] + 3) mod vocab."""
    start = torch.randint(0, vocab, (batch, 1), generator=generator)
    seq = [start]
    for _ in range(seq_length):
        seq.append((seq[-1] * 5 + 3) % vocab)
    tokens = torch.cat(seq, dim=1)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


def wait_at_gate(gate: str, timeout_s: float = 300.0) -> None:
    """Touch ``<gate>.rank<N>``, then block until the file ``gate`` exists: a test acts on this rank
    (e.g. signals it) at a known point of start-up, then opens the gate."""
    Path(f"{gate}.rank{torch.distributed.get_rank()}").touch()
    deadline = time.monotonic() + timeout_s
    while not os.path.exists(gate):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{gate} not created within {timeout_s:.0f} s")
        time.sleep(0.05)


def instrument_steps(trainer, signal_at_step: int | None = None) -> list:
    """Wrap ``trainer.stage.on_step`` (any stage): after it, append the optimiser's
    ``group_settings`` (the learning rates the step will use, frozen groups at 0) to the returned
    list; at ``signal_at_step`` rank 0 also sends itself SIGUSR1, a pre-emption the trainer acts on
    after that step."""
    from megatron_finevit.training.optim import group_settings
    from megatron_finevit.training.trainer import _unwrap

    records, on_step = [], trainer.stage.on_step

    def instrumented_on_step(step, model_chunks, optimizer):
        on_step(step, model_chunks, optimizer)
        records.append(group_settings(optimizer, _unwrap(model_chunks[0])))
        if step == signal_at_step and torch.distributed.get_rank() == 0:
            os.kill(os.getpid(), signal.SIGUSR1)

    trainer.stage.on_step = instrumented_on_step
    return records


@dataclass
class ToyLMConfig:
    num_layers: int = 2
    seq_length: int = 16
    micro_batch_size: int = 2
    vocab_size: int = 128
    nan_loss_steps: list[int] = field(default_factory=list)  # inject a NaN loss at these steps
    signal_at_step: int | None = None  # rank 0 sends itself SIGUSR1 before this step (pre-emption)
    step_sleep_s: float = 0.0  # slow each step down, so an outside signal lands mid-run (Slurm test)
    build_gate: str | None = None  # build_model waits for this file (a signal lands mid-build)
    dropout: float = 0.0  # hidden and attention dropout (training draws random numbers)
    # named optimiser groups: {name: {"params": glob over parameter names, optional "max_lr",
    # optional "frozen_before": the group's lr is 0 before that step}}
    param_groups: dict = field(default_factory=dict)


class ToyBatches:
    """Resumable stream of micro-batches for one DP rank."""

    def __init__(self, cfg: ToyLMConfig, seed: int, dp_rank: int):
        self.cfg = cfg
        self.generator = torch.Generator().manual_seed(seed * 1000 + dp_rank)
        self.position = 0

    def __iter__(self):
        return self

    def __next__(self):
        self.position += 1
        tokens, labels = learnable_batch(self.cfg.seq_length, self.cfg.micro_batch_size,
                                         self.cfg.vocab_size, self.generator)
        return {"tokens": tokens, "labels": labels}

    def state_dict(self) -> dict:
        return {"position": self.position, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.position = state["position"]
        self.generator.set_state(state["generator"])


class ToyLMStage:
    name = "toy_lm"

    def __init__(self, run: TrainConfig):
        self.run = run
        self.cfg = from_dict(ToyLMConfig, run.stage_config, "stage_config.")
        p = run.parallel
        self.gpt = RunConfig(tp=p.tensor_parallel, pp=p.pipeline_parallel,
                             sequence_parallel=p.sequence_parallel,
                             distributed_optimizer=p.distributed_optimizer,
                             micro_batch_size=self.cfg.micro_batch_size,
                             seq_length=self.cfg.seq_length, vocab_size=self.cfg.vocab_size,
                             num_layers=self.cfg.num_layers, params_dtype=run.params_dtype())
        self.step = 0

    def model_dims(self) -> dict[str, int]:
        return {"num_attention_heads": 4, "num_query_groups": 2, "num_layers": self.cfg.num_layers}

    def transformer_config(self):
        g, d = self.gpt, self.cfg.dropout
        return tiny_qwen3(g).to_transformer_config(
            g.tp, g.pp, sequence_parallel=g.sequence_parallel, params_dtype=g.params_dtype,
            hidden_dropout=d, attention_dropout=d)

    def build_model(self, pre_process: bool, post_process: bool):
        if self.cfg.build_gate:
            wait_at_gate(self.cfg.build_gate)
        from megatron_finevit.models.llm import build_qwen3

        return build_qwen3(tiny_qwen3(self.gpt), self.transformer_config(),
                           pre_process=pre_process, post_process=post_process)

    def build_data(self, dp_rank: int, dp_size: int) -> ToyBatches:
        return ToyBatches(self.cfg, self.run.seed, dp_rank)

    def sequence_shape(self) -> tuple[int, int]:
        return self.cfg.seq_length, self.cfg.micro_batch_size

    def forward_step(self, batch, model):
        device = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"
        tokens, labels = batch["tokens"].to(device), batch["labels"].to(device)
        position_ids = torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0).expand_as(tokens)
        output = model(tokens, position_ids, None, labels=labels)
        poison = self.step in self.cfg.nan_loss_steps

        def loss_fn(output_tensor):
            loss = output_tensor.float().mean()
            if poison:
                loss = loss * float("nan")
            return loss, {"loss": loss.detach().clone()}

        return output, loss_fn

    def work(self, batch) -> tuple[float, float, float]:
        """Samples, tokens and forward+backward FLOPs (6 x parameters per token, plus the
        attention score and value matmuls)."""
        b, s = batch["tokens"].shape
        c = self.transformer_config()
        kv = c.num_query_groups * c.kv_channels
        per_layer = c.hidden_size * (c.hidden_size + 2 * kv) + c.hidden_size ** 2 \
            + 3 * c.hidden_size * c.ffn_hidden_size
        params = c.num_layers * per_layer + 2 * self.cfg.vocab_size * c.hidden_size
        attention = c.num_layers * 2 * s * c.hidden_size  # QK^T and AV per token, causal ~half x2
        return b, b * s, 6.0 * b * s * params + 3.0 * b * s * attention

    def optimizer_overrides(self) -> dict:
        from megatron.core.optimizer import ParamKey

        from megatron_finevit.training.optim import named_overrides

        return named_overrides(self.run, {
            name: (ParamKey(name=group["params"]),
                   {"max_lr": group["max_lr"]} if "max_lr" in group else {})
            for name, group in self.cfg.param_groups.items()})

    def on_step(self, step: int, model_chunks: list, optimizer) -> None:
        from megatron_finevit.training.optim import groups_named

        self.step = step
        for name, group in self.cfg.param_groups.items():
            if step < group.get("frozen_before", 0):
                for param_group in groups_named(optimizer, name):
                    param_group["lr"] = 0.0
        if self.cfg.step_sleep_s:
            time.sleep(self.cfg.step_sleep_s)
        if step == self.cfg.signal_at_step and torch.distributed.get_rank() == 0:
            os.kill(os.getpid(), signal.SIGUSR1)

    def evaluate(self, model_chunks: list) -> dict[str, float]:
        return {}
