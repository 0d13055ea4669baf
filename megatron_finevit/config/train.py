"""The run configuration: what every stage shares (parallelism, optimiser, schedule, checkpoints,
logging). Stage-specific settings live in ``stage_config`` and are validated by the stage itself
(``training.stages``), so adding a stage never touches this file.

Batch sizes count *micro-batches*: a micro-batch is one packed sequence of ``token_budget`` ViT
tokens (a variable number of images) or a fixed number of samples, as the stage defines it.
``global_batch_size`` micro-batches are consumed per optimiser step, split across data-parallel
ranks, so each rank runs ``global_batch_size / data_parallel`` micro-batches per step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from megatron_finevit.config.errors import ConfigError


@dataclass
class ParallelSection:
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    context_parallel: int = 1
    sequence_parallel: bool = False
    distributed_optimizer: bool = True


@dataclass
class OptimSection:
    lr: float = 1e-3
    min_lr: float = 0.0
    weight_decay: float = 0.05
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-6
    clip_grad: float = 1.0
    warmup_steps: int = 0
    decay_style: str = "cosine"   # megatron OptimizerParamScheduler: cosine, linear, constant, WSD


@dataclass
class CheckpointSection:
    dir: str | None = None          # None: no checkpoints
    save_interval: int = 0          # steps between saves; 0: only at the end and on signals
    keep_last: int = 2              # older published checkpoints are deleted
    resume: bool = True             # load the latest checkpoint in ``dir`` if there is one
    load_dir: str | None = None     # initialise from another run's checkpoint (weights only)
    save_on_signal: bool = True     # SIGTERM / SIGUSR1 -> save and exit (Slurm pre-emption)


@dataclass
class LoggingSection:
    log_interval: int = 1
    tensorboard_dir: str | None = None
    progress_bar: bool | None = None  # None: only when stdout is a terminal
    peak_tflops: float | None = None  # per device, for MFU; None: bf16 peak by GPU name, or a
                                      # measured large-GEMM rate on CPU


@dataclass
class EvalSection:
    interval: int = 0                 # steps between evaluations; 0: only before and after
    at_start: bool = True
    at_end: bool = True


@dataclass
class TrainConfig:
    stage: str = "mim"                # mim | contrastive | align (sft: a later issue)
    engine: str = "megatron"          # megatron | deepspeed (ZeRO-2, data parallel only)
    seed: int = 1234
    train_steps: int = 100
    global_batch_size: int = 2        # micro-batches per optimiser step (all DP ranks together)
    precision: str = "auto"           # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32
    device: str | None = None         # None: CUDA when present, else CPU
    max_bad_steps: int = 10           # steps skipped for non-finite loss before aborting
    parallel: ParallelSection = field(default_factory=ParallelSection)
    optim: OptimSection = field(default_factory=OptimSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    eval: EvalSection = field(default_factory=EvalSection)
    stage_config: dict[str, Any] = field(default_factory=dict)

    def params_dtype(self):
        """The models' parameter dtype: bf16 for precision bf16, or auto on a CUDA device (the
        stages build their TransformerConfigs with it; the trainer wraps bf16 models in
        megatron's Float16Module); else fp32."""
        import torch

        if self.precision == "auto":
            on_gpu = self.device != "cpu" and torch.cuda.is_available()
            return torch.bfloat16 if on_gpu else torch.float32
        return torch.bfloat16 if self.precision == "bf16" else torch.float32

    def problems(self) -> list[str]:
        """One line per inconsistency of the run config itself (the stage checks
        ``stage_config``, ``training.preflight`` the layout, the batch and the files)."""
        problems = []
        if self.engine not in ("megatron", "deepspeed"):
            problems.append(f"engine must be 'megatron' or 'deepspeed', got {self.engine!r}")
        if self.precision not in ("auto", "bf16", "fp32"):
            problems.append(f"precision must be auto, bf16 or fp32, got {self.precision!r}")
        if self.train_steps < 0:
            problems.append(f"train_steps={self.train_steps} must be >= 0")
        if self.global_batch_size < 1:
            problems.append(f"global_batch_size={self.global_batch_size} must be >= 1")
        if self.optim.warmup_steps > max(self.train_steps, 0):
            problems.append(f"optim.warmup_steps={self.optim.warmup_steps} exceeds "
                            f"train_steps={self.train_steps}")
        if self.engine == "deepspeed":
            p = self.parallel
            if (p.tensor_parallel, p.pipeline_parallel, p.context_parallel) != (1, 1, 1):
                problems.append("engine 'deepspeed' is data parallel only: set tensor, pipeline "
                                "and context parallel to 1")
        if self.checkpoint.save_interval and not self.checkpoint.dir:
            problems.append("checkpoint.save_interval is set but checkpoint.dir is not")
        return problems

    def validate(self) -> None:
        """Raise ``ConfigError`` listing every problem of ``problems()``."""
        problems = self.problems()
        if problems:
            raise ConfigError(problems)
