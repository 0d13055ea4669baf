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
    # megatron-core's features for scale, passed through (README "Overlap and fusion"):
    overlap_grad_reduce: bool = False   # DDP: reduce gradient buckets during the backward pass
    overlap_param_gather: bool = False  # DDP: all-gather updated weights in the next forward
    bucket_size: int | None = None      # DDP bucket in elements; None: megatron's max(4e7, 1e6·DP)
    # interleaved 1F1B: model chunks per pipeline rank (1: none); stages that support it (the
    # FineViT-VL LM) split their layers into pipeline_parallel x this many chunks
    virtual_pipeline_parallel: int = 1
    # TransformerEngine (spec_backend te, GPU) only, passed to every tower's TransformerConfig
    # (transformer_overrides); not exercised on the CPU machines this is tested on:
    gradient_accumulation_fusion: bool = False  # wgrad GEMM adds into main_grad (TE kernel)
    tp_comm_overlap: bool = False       # TE userbuffers: TP collectives inside the GEMMs

    def problems(self, engine: str, stage_config: dict) -> list[str]:
        """One line per combination megatron-core cannot run (its asserts, as config errors)."""
        problems = []
        if engine == "deepspeed" and (self.overlap_grad_reduce or self.overlap_param_gather
                                      or self.bucket_size is not None):
            problems.append("parallel.overlap_grad_reduce, overlap_param_gather and bucket_size "
                            "configure megatron's DDP: engine 'deepspeed' does not use them")
        if self.overlap_param_gather and not self.distributed_optimizer:
            problems.append("parallel.overlap_param_gather needs parallel.distributed_optimizer")
        if self.overlap_param_gather and not self.overlap_grad_reduce:
            # megatron-LM's arguments.py asserts the same: the gather is chained to the reduce
            problems.append("parallel.overlap_param_gather needs parallel.overlap_grad_reduce")
        if self.bucket_size is not None and self.bucket_size < 1:
            problems.append(f"parallel.bucket_size={self.bucket_size} must be >= 1 or null")
        vp = self.virtual_pipeline_parallel
        if not isinstance(vp, int) or vp < 1:
            problems.append(f"parallel.virtual_pipeline_parallel={vp!r} must be an integer >= 1 "
                            "(1: no interleaving)")
        elif vp > 1 and self.pipeline_parallel < 2:
            problems.append(f"parallel.virtual_pipeline_parallel={vp} needs pipeline_parallel "
                            ">= 2 (it splits each pipeline rank's layers into chunks)")
        for key in TE_ONLY_FIELDS:
            local = [t for t, b in _spec_backends(stage_config).items() if b != "te"]
            if getattr(self, key) and (local or not _spec_backends(stage_config)):
                problems.append(f"parallel.{key} needs spec_backend te (TransformerEngine, GPU) "
                                f"for every tower; {', '.join(local) or 'the stage'} use(s) the "
                                "local spec")
        if self.tp_comm_overlap and (self.tensor_parallel < 2 or not self.sequence_parallel):
            problems.append("parallel.tp_comm_overlap needs tensor_parallel >= 2 and "
                            "sequence_parallel")
        return problems

    def transformer_overrides(self) -> dict:
        """The ``TransformerConfig`` fields this section passes to every tower the stages build
        (only those set: ``problems`` allows them with the te spec alone)."""
        return {key: True for key in TE_ONLY_FIELDS if getattr(self, key)}


# TransformerConfig switches that need TransformerEngine's layers (and a GPU)
TE_ONLY_FIELDS = ("gradient_accumulation_fusion", "tp_comm_overlap")


def _spec_backends(stage_config: dict) -> dict[str, str]:
    """The layer spec of each tower the stage config names (``<tower>_overrides.spec_backend``;
    the presets and model configs default to local)."""
    return {tower: (stage_config.get(f"{tower}_overrides") or {}).get("spec_backend", "local")
            for tower in ("vit", "text", "llm") if tower in stage_config}


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
    # the logging rank writes every evaluation of the run to this JSON file, keyed "start", the
    # step (periodic ones) and "end", each the metrics ``python -m megatron_finevit.evaluate
    # --json`` writes for the same checkpoint: the evaluations before and after a stage without
    # two more processes loading the model (the quick start). Rewritten after each evaluation.
    results_json: str | None = None


@dataclass
class TrainConfig:
    stage: str = "mim"                # mim | contrastive | align (sft: a later issue)
    engine: str = "megatron"          # megatron | deepspeed (ZeRO-2, data parallel only)
    seed: int = 1234
    train_steps: int = 100
    global_batch_size: int = 2        # micro-batches per optimiser step (all DP ranks together)
    # samples per optimiser step; when > 0 it replaces global_batch_size: each data phase (e.g.
    # Stage II's 336² -> 448² switch) gets the micro-batch count that holds this many samples
    # (training.batch_schedule), so the batch stays constant in samples through the switch
    samples_per_step: int = 0
    # with samples_per_step: round the packs per DP rank up and fill them to the tokens that
    # hold samples_per_step (every step within the packs' spread, < 1 / packs-per-rank padding);
    # false: round the pack count, full packs (± half a pack per DP rank)
    samples_per_step_fill: bool = True
    # set from samples_per_step at start-up: [[start_step, micro-batches], ...] after step 0
    global_batch_schedule: list = field(default_factory=list)
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

    def global_batch_at(self, step: int) -> int:
        """Micro-batches (all DP ranks together) of optimiser step ``step``."""
        value = self.global_batch_size
        for start, micro_batches in self.global_batch_schedule:
            if step >= start:
                value = micro_batches
        return value

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
        if not isinstance(self.samples_per_step, int) or self.samples_per_step < 0:
            problems.append(f"samples_per_step={self.samples_per_step!r} must be an integer >= 0 "
                            "(0: global_batch_size micro-batches per step)")
        elif self.samples_per_step and self.engine == "deepspeed":
            problems.append("samples_per_step needs engine megatron (DeepSpeed fixes its "
                            "gradient accumulation steps at start-up)")
        if self.optim.warmup_steps > max(self.train_steps, 0):
            problems.append(f"optim.warmup_steps={self.optim.warmup_steps} exceeds "
                            f"train_steps={self.train_steps}")
        if self.engine == "deepspeed":
            p = self.parallel
            if (p.tensor_parallel, p.pipeline_parallel, p.context_parallel) != (1, 1, 1):
                problems.append("engine 'deepspeed' is data parallel only: set tensor, pipeline "
                                "and context parallel to 1")
        problems += self.parallel.problems(self.engine, self.stage_config)
        if self.checkpoint.save_interval and not self.checkpoint.dir:
            problems.append("checkpoint.save_interval is set but checkpoint.dir is not")
        return problems

    def interleaving_problems(self, data_parallel: int) -> list[str]:
        """Under a virtual pipeline megatron's interleaved schedule needs each rank's micro-batches
        per step to be a multiple of pipeline_parallel (its groups of PP micro-batches per chunk):
        one line per step size (``global_batch_size`` and the schedule's) that is not."""
        p = self.parallel
        if p.virtual_pipeline_parallel < 2 or p.pipeline_parallel < 2 or data_parallel < 1:
            return []
        multiple = data_parallel * p.pipeline_parallel
        sizes = [self.global_batch_size] + [n for _, n in self.global_batch_schedule]
        return [f"global_batch_size={n}: virtual_pipeline_parallel needs the micro-batches per "
                f"step to be a multiple of data_parallel x pipeline_parallel = {data_parallel} x "
                f"{p.pipeline_parallel} = {multiple} (megatron's interleaved 1F1B runs each "
                f"chunk on groups of pipeline_parallel micro-batches)"
                for n in dict.fromkeys(sizes) if n % multiple]

    def validate(self) -> None:
        """Raise ``ConfigError`` listing every problem of ``problems()``."""
        problems = self.problems()
        if problems:
            raise ConfigError(problems)
