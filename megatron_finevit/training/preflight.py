"""Everything a run can be checked for before a process group or a model exists, all at once.

    stage = check_run(cfg, launch_world_size())   # raises UserError listing every problem

One list, one line per problem, from:

* the run config (``TrainConfig.problems``) and the stage's: constructing the stage parses and
  checks ``stage_config`` (unknown keys with the closest known one, types, presets, model shapes
  at the layout) and reads no file;
* the layout on ``world_size`` ranks (``ParallelConfig.problems``: TP×PP×CP dividing the world,
  SP without TP, heads and layers) and the batch (``global_batch_size`` micro-batches split
  evenly over the data-parallel ranks);
* the file system: every input the stage's config names (``config_class.input_paths()``:
  indexed shard directories, model directories, files, checkpoints), the checkpoint a resume
  would load (``checkpoint.dir``'s ``latest`` and its files) or else ``checkpoint.load_dir``'s.

``--dry-run`` uses the same checks for a cluster-sized world on a laptop, where the cluster's
paths do not exist: there the file-system findings are warnings.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megatron_finevit.config.errors import ConfigError, UserError

PATH_KINDS = ("shards", "hf_model", "file", "directory", "checkpoint", "run_checkpoint")


@dataclass(frozen=True)
class InputPath:
    """A file a stage reads: its dotted config key (for messages), the path, and what must be
    there — ``shards`` (a directory with ``index.zarr``), ``hf_model`` (a directory with a
    transformers ``config.json``), ``file``, ``directory``, ``checkpoint`` (a dist_checkpointing
    directory) or ``run_checkpoint`` (a training run's checkpoint directory, with ``latest``)."""

    key: str
    path: str
    kind: str


class PreflightErrors(UserError):
    """User errors of several kinds (config, checkpoint), printed together."""

    def __init__(self, errors: list[UserError]):
        self.errors = errors
        super().__init__([problem for error in errors for problem in error.problems])

    def lines(self) -> list[str]:
        return [line for error in self.errors for line in error.lines()]


@dataclass
class Findings:
    """What ``find_problems`` found: the stage (None when its config has problems), problems
    of config/layout/batch, and of the file system (missing inputs, unusable checkpoints)."""

    stage: Any | None
    problems: list[str] = field(default_factory=list)
    path_problems: list[str] = field(default_factory=list)
    checkpoint_problems: list[str] = field(default_factory=list)

    def error(self, with_paths: bool = True) -> UserError | None:
        from megatron_finevit.training.checkpoint_files import CheckpointError

        config = self.problems + (self.path_problems if with_paths else [])
        checkpoint = self.checkpoint_problems if with_paths else []
        errors = [error for error in (config and ConfigError(config),
                                      checkpoint and CheckpointError(checkpoint)) if error]
        return PreflightErrors(errors) if errors else None


def launch_world_size(environ: dict[str, str] | None = None) -> int:
    """The world size torchrun (WORLD_SIZE) or srun (SLURM_NTASKS) launched, 1 alone."""
    from megatron_finevit.platform.distributed import dist_env_from_environ

    try:
        return dist_env_from_environ(environ).world_size
    except (RuntimeError, ValueError) as exc:
        raise ConfigError(f"launcher environment: {exc}") from None


def find_problems(cfg, world_size: int, problems: list[str] | None = None) -> Findings:
    """Every problem of ``cfg`` on ``world_size`` ranks (``problems``: those found while loading
    it, e.g. unknown keys). Constructs the stage; builds nothing else."""
    from megatron_finevit.platform.parallel import ParallelConfig
    from megatron_finevit.training.stage import get_stage

    found = Findings(None, list(problems or []) + cfg.problems())
    try:
        stage_class = get_stage(cfg.stage)
    except ConfigError as exc:
        stage_class = None
        found.problems += exc.problems
    if stage_class is not None:
        try:
            found.stage = stage_class(cfg)
        except ConfigError as exc:
            found.problems += exc.problems
        found.path_problems = [problem for path in stage_input_paths(stage_class, cfg)
                               for problem in input_path_problems(path)]
    p = cfg.parallel
    layout = ParallelConfig(tensor_parallel=p.tensor_parallel,
                            pipeline_parallel=p.pipeline_parallel,
                            context_parallel=p.context_parallel,
                            sequence_parallel=p.sequence_parallel,
                            virtual_pipeline=p.virtual_pipeline_parallel
                            if isinstance(p.virtual_pipeline_parallel, int)
                            and p.virtual_pipeline_parallel > 1 else None)
    if layout.virtual_pipeline and found.stage is not None and not getattr(
            found.stage, "supports_virtual_pipeline", False):
        found.problems.append(f"parallel.virtual_pipeline_parallel: stage {cfg.stage!r} does not "
                              "build model chunks (only the FineViT-VL stages do: align, sft)")
    dims = found.stage.model_dims() if found.stage is not None else {}
    layout_problems = layout.problems(world_size, **dims)
    found.problems += [f"parallel: {problem}" for problem in layout_problems]
    if not layout_problems:
        found.problems += _batch_problems(cfg, world_size // layout.model_parallel)
    found.checkpoint_problems = checkpoint_problems(cfg.checkpoint)
    return found


def stage_input_paths(stage_class, cfg) -> list[InputPath]:
    """The inputs ``stage_config`` names, read from the stage's config dataclass
    (``config_class.input_paths()``), so they are checked even when other settings are wrong."""
    from megatron_finevit.config.loader import parse_config

    config_class = getattr(stage_class, "config_class", None)
    if config_class is None or not hasattr(config_class, "input_paths"):
        return []  # a stage that reads no files (the toy LM)
    return parse_config(config_class, cfg.stage_config, "stage_config.", []).input_paths()


def check_run(cfg, world_size: int):
    """The validated stage of ``cfg``; raises ``UserError`` listing every problem first."""
    found = find_problems(cfg, world_size)
    error = found.error()
    if error is not None:
        raise error
    return found.stage


def _batch_problems(cfg, data_parallel: int) -> list[str]:
    if cfg.samples_per_step:  # the micro-batch counts are made multiples of DP at start-up
        return []  # (and checked for a virtual pipeline there)
    if cfg.global_batch_size % data_parallel == 0:
        return cfg.interleaving_problems(data_parallel)
    if cfg.global_batch_size < 1 or cfg.global_batch_size % data_parallel == 0:
        return []
    lower = cfg.global_batch_size // data_parallel * data_parallel
    nearest = [n for n in (lower, lower + data_parallel) if n > 0]
    return [f"global_batch_size={cfg.global_batch_size} micro-batches do not split evenly over "
            f"data_parallel={data_parallel} ranks: use a multiple of {data_parallel}, e.g. "
            + " or ".join(map(str, nearest))]


def input_path_problems(item: InputPath) -> list[str]:
    """What is wrong with one stage input on this machine (empty: it is usable)."""
    path = Path(item.path)
    if item.kind not in PATH_KINDS:
        raise ValueError(f"InputPath kind {item.kind!r} is not one of {PATH_KINDS}")
    where = f"{item.key}={item.path}"
    if item.kind == "file":
        return [] if path.is_file() else [f"{where}: no such file"]
    if item.kind == "run_checkpoint":
        return published_checkpoint_problems(item.key, item.path)[1]
    if not path.is_dir():
        return [f"{where}: no such directory"]
    if item.kind == "shards" and not (path / "index.zarr").is_dir():
        return [f"{where} has no index.zarr: index it with `python tools/build_index.py {path}`"]
    if item.kind == "hf_model" and not (path / "config.json").is_file():
        return [f"{where} has no config.json: give a local transformers checkpoint directory"]
    if item.kind == "checkpoint":
        from megatron_finevit.training.checkpoint_files import checkpoint_file_problems

        return [f"{item.key}: {problem}" for problem in checkpoint_file_problems(path)]
    return []


def checkpoint_problems(ck) -> list[str]:
    """The checkpoint the trainer would load — ``checkpoint.dir``'s newest when resuming, else
    ``checkpoint.load_dir``'s — exists and is whole (``checkpoint_files``)."""
    if ck.dir and ck.resume:
        found, problems = published_checkpoint_problems("checkpoint.dir", ck.dir, required=False)
        if found or problems:
            return problems  # resuming: load_dir is not read
    if ck.load_dir:
        return published_checkpoint_problems("checkpoint.load_dir", ck.load_dir)[1]
    return []


def published_checkpoint_problems(key: str, directory: str, required: bool = True
                                  ) -> tuple[bool, list[str]]:
    """(whether ``directory`` has a ``latest`` checkpoint, the problems of it — or that it has
    none, when ``required``). ``key`` names the setting in the messages."""
    from megatron_finevit.training.checkpoint_files import (
        CheckpointError,
        checkpoint_file_problems,
    )
    from megatron_finevit.training.checkpointing import latest_checkpoint

    if not Path(directory).is_dir():
        return False, [f"{key}={directory}: no such directory"] if required else []
    try:
        path = latest_checkpoint(directory)
    except CheckpointError as exc:
        return True, [f"{key}: {problem}" for problem in exc.problems]
    if path is None:
        none = f"{key}={directory} holds no checkpoint (no `latest` file)"
        return False, [none] if required else []
    return True, [f"{key}: {problem}" for problem in checkpoint_file_problems(path)]
