"""The stage plug-in interface (Megatron's ``pretrain(model_provider, forward_step,
datasets_provider)`` convention, as one object).

The loop (``training/trainer.py``) knows nothing about MIM, SigLIP or QA: a stage supplies the
model, the data, the forward step and its trainable policy. Adding a stage is one module plus one
``register_stage`` line, never a change to the loop.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, Iterator, Protocol

import torch

from megatron_finevit.config.train import TrainConfig


class ResumableIterator(Protocol):
    """An infinite iterator of micro-batches whose position can be saved and restored."""

    def __iter__(self) -> Iterator[Any]: ...
    def __next__(self) -> Any: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


LossFn = Callable[[torch.Tensor], tuple[torch.Tensor, dict[str, torch.Tensor]]]


class Stage(Protocol):
    """What a training stage provides. ``run`` is the whole run config; the stage parses and
    validates ``run.stage_config`` into its own dataclass in ``__init__`` (reading no file,
    raising ``ConfigError`` with every problem). Optional, for ``training.preflight`` and
    ``--dry-run``: ``config_class`` (that dataclass, with ``input_paths()``: the files the stage
    reads) and ``microbatch_phases(data_parallel=1)`` (samples per micro-batch, per schedule phase,
    on one of ``data_parallel`` ranks; ``samples_per_step`` sets the packs per step from it); for the
    logs, ``finalize_metrics(metrics)`` turns the step's averaged metrics into the logged ones
    (e.g. ratios of summed terms); for work before megatron's schedule,
    ``prepare_step(data, model_chunks, num_microbatches)`` returns the iterator the schedule
    reads (e.g. the step's micro-batches, fetched from ``data`` once and replayed) and may
    accumulate gradients (the grad buffers are zeroed before it). Virtual pipeline stages
    (``parallel.virtual_pipeline_parallel``) need ``build_model(pre_process, post_process,
    vp_stage=i)`` building chunk ``i`` of this pipeline rank (the FineViT-VL stages: align, sft)."""

    name: str

    def __init__(self, run: TrainConfig) -> None: ...

    def model_dims(self) -> dict[str, int]:
        """num_attention_heads / num_query_groups / num_layers for parallel-layout validation."""

    def transformer_config(self):
        """megatron TransformerConfig for the model (parallel sizes and precision filled in)."""

    def build_model(self, pre_process: bool, post_process: bool) -> torch.nn.Module:
        """This pipeline stage's part of the model (a megatron module)."""

    def build_data(self, dp_rank: int, dp_size: int) -> ResumableIterator:
        """Micro-batches for this data-parallel rank (every PP/TP rank of the slice gets the
        same sequence; the stage decides what each pipeline stage actually loads)."""

    def sequence_shape(self) -> tuple[int, int]:
        """(seq_length, micro_batch_size) of the activations passed between pipeline stages."""

    def forward_step(self, batch: Any, model: torch.nn.Module) -> tuple[torch.Tensor, LossFn]:
        """megatron's convention: the output tensor and a loss function of it, which returns
        (scalar loss, {metric name: detached scalar tensor})."""

    def work(self, batch: Any) -> tuple:
        """(samples, tokens, model FLOPs of forward + backward) in this micro-batch, optionally
        followed by ``{name: count}`` of further tokens to log as rates (``<name>_per_s``)."""

    def optimizer_overrides(self) -> dict:
        """megatron ``{ParamKey: ParamGroupOverride}`` giving some parameters their own optimiser
        groups (e.g. a tower that is frozen first), or {}."""

    def on_step(self, step: int, model_chunks: list, optimizer) -> None:
        """Apply the trainable policy and schedules before ``step`` (resolution, text context,
        freezing). Freezing keeps parameters in DDP and the optimiser (megatron's grad buffers
        are fixed at wrap time) and sets their groups' learning rate to zero."""

    def evaluate(self, model_chunks: list) -> dict[str, float]:
        """Evaluation metrics (rank-0 values are logged)."""


_STAGES: dict[str, str] = {}


def register_stage(name: str, target: str) -> None:
    """Register ``"package.module:ClassName"`` under ``name`` (imported lazily)."""
    _STAGES[name] = target


def get_stage(name: str) -> type:
    if name not in _STAGES:
        from megatron_finevit.config.errors import ConfigError, unknown_choice

        raise ConfigError(f"stage: {unknown_choice('stage', name, _STAGES)}")
    module_name, _, class_name = _STAGES[name].partition(":")
    return getattr(importlib.import_module(module_name), class_name)


register_stage("toy_lm", "megatron_finevit.testing.toy_stage:ToyLMStage")
register_stage("mim", "megatron_finevit.training.stages.mim:MIMStage")
register_stage("contrastive", "megatron_finevit.training.stages.contrastive:ContrastiveStage")
register_stage("align", "megatron_finevit.training.stages.align:AlignStage")
register_stage("sft", "megatron_finevit.training.stages.sft:SFTStage")
