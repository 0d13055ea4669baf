"""Checkpoints: megatron ``dist_checkpointing`` (torch_dist), written atomically.

Layout of ``checkpoint.dir``::

    iter_0000100/            a published checkpoint (any TP/PP/DP can load it)
    iter_0000200/
    latest                   text file: the name of the newest published checkpoint
    iter_0000300.tmp/        a save in progress (or one killed mid-way: ignored, removed later)

A save writes everything into ``iter_N.tmp``, waits for every rank, then rank 0 renames it to
``iter_N`` and replaces ``latest`` through a temporary file and ``os.replace``. A save killed at
any point therefore leaves ``latest`` naming the previous complete checkpoint.

Contents: the model and optimiser (sharded; megatron reshards them for a different TP/PP/DP at
load), the LR scheduler and the train state (common), and per rank the RNG states and the data
loader's position. RNG and data-loader states only make sense for the parallel layout they were
saved with: loading at another layout restores model, optimiser and schedule, and says that the
data order and random streams restart.

A model is one module or, under a virtual pipeline, the list of this rank's chunks (each under
its own key, ``model``, ``model1``, ...): tensor keys carry global layer numbers either way, so a
checkpoint loads at any virtual-pipeline size too.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from megatron_finevit.training.checkpoint_files import CheckpointError, reading_checkpoint
from megatron_finevit.training.optim import check_groups_after_load, group_settings

log = logging.getLogger(__name__)

LATEST = "latest"


@dataclass
class TrainState:
    step: int = 0
    consumed_microbatches: int = 0
    consumed_samples: int = 0   # samples of every DP rank (a checkpoint before it was added: 0)
    skipped_steps: int = 0


def _layout() -> dict:
    from megatron.core import parallel_state as ps

    return {"tp": ps.get_tensor_model_parallel_world_size(),
            "pp": ps.get_pipeline_model_parallel_world_size(),
            "cp": ps.get_context_parallel_world_size(),
            "dp": ps.get_data_parallel_world_size()}


def _rank_coords() -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(global shape, offset) of this rank in the (pp, tp, cp, dp) grid."""
    from megatron.core import parallel_state as ps

    shape = (ps.get_pipeline_model_parallel_world_size(), ps.get_tensor_model_parallel_world_size(),
             ps.get_context_parallel_world_size(), ps.get_data_parallel_world_size())
    offset = (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank(),
              ps.get_context_parallel_rank(), ps.get_data_parallel_rank())
    return shape, offset


def rng_state() -> dict:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    kind, keys, pos, has_gauss, cached = np.random.get_state()
    # Plain lists and tensors only: checkpoints are read back with torch.load(weights_only=True).
    state = {"python": random.getstate(),
             "numpy": [kind, torch.from_numpy(keys.copy()), pos, has_gauss, cached],
             "torch": torch.get_rng_state(), "tracker": get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy(), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    get_cuda_rng_tracker().set_states(state["tracker"])


def _per_rank_object(key: str, data):
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    shape, offset = _rank_coords()
    return ShardedObject(key, data, shape, offset, replica_id=0)


def _chunks(model) -> list:
    """A model's chunks: the list itself, or the one module."""
    return list(model) if isinstance(model, (list, tuple)) else [model]


def _model_key(index: int) -> str:
    return "model" if index == 0 else f"model{index}"


def _named(model):
    """What ``group_settings`` reads parameter names from (chunk-prefixed for several)."""
    chunks = _chunks(model)
    return chunks[0] if len(chunks) == 1 else torch.nn.ModuleList(chunks)


def _sharded_state(model, optimizer, is_loading: bool, with_rank_states: bool, rank_states: dict):
    """The dist_checkpointing template for saving (with data) or loading (shapes only)."""
    state = {_model_key(i): chunk.sharded_state_dict() for i, chunk in enumerate(_chunks(model))}
    model_sd = state["model"] if len(state) == 1 else dict(state)
    if optimizer is not None:
        # 'fully_reshardable': the distributed optimizer's state can be loaded at any TP/PP/DP
        # (megatron's default format here trips over flattened ranges in 0.19). Its
        # memory-efficient variant gathers over the gloo DP group — the only path without CUDA.
        state["optimizer"] = optimizer.sharded_state_dict(
            model_sd, is_loading=is_loading,
            metadata={"distrib_optim_sharding_type": "fully_reshardable",
                      "distrib_optim_fully_reshardable_mem_efficient": not torch.cuda.is_available()})
    if with_rank_states:
        for key, value in rank_states.items():
            state[key] = _per_rank_object(key, value)
    return state


def _drop_absent_factories(model_sd: dict, path) -> list[str]:
    """Remove (in place) the sharded-tensor factories of ``model_sd`` whose tensor the checkpoint
    at ``path`` lacks; returns their keys. A weights-only load tolerates absent plain tensors
    (``StrictHandling.RETURN_ALL``) but not absent factories (e.g. a gated MLP's fc1 split into
    gate and up): megatron's ``apply_factory_merges`` fails on them. So a Stage III model (its LLM
    has gated MLPs) can start from a Stage II checkpoint, which holds only the encoder's."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory
    from torch.distributed.checkpoint import FileSystemReader

    with reading_checkpoint(path):
        stored = FileSystemReader(str(path)).read_metadata().state_dict_metadata
    absent = [name for name, item in model_sd.items()
              if isinstance(item, ShardedTensorFactory) and item.key not in stored]
    for name in absent:
        del model_sd[name]
    return absent


def _materialise_optimizer_state(optimizer) -> None:
    """Give every parameter of a fresh torch Adam its (zero) state, ``step`` included.

    Without Apex or TransformerEngine, megatron's ``DistributedOptimizer.state_dict`` reads a
    ``step`` from every parameter's state (distrib_optimizer.py, "Extract 'step', for non-Apex/TE
    support"), but a freshly built torch Adam creates its state lazily at the first step, so a
    loading template cannot be built before training. torch's Adam would create these same zeros.
    """
    for chained in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = chained.optimizer
        for group in inner.param_groups:
            for param in group["params"]:
                state = inner.state[param]
                if "step" not in state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)


def _optimizer_kind(optimizer) -> str:
    chained = getattr(optimizer, "chained_optimizers", [optimizer])
    return "distributed" if type(chained[0]).__name__ == "DistributedOptimizer" else "local"


def latest_checkpoint(directory: str | Path) -> Path | None:
    """The newest published checkpoint in ``directory``, or None."""
    pointer = Path(directory) / LATEST
    if not pointer.is_file():
        return None
    path = Path(directory) / pointer.read_text().strip()
    if not path.is_dir():
        raise CheckpointError(f"{pointer} names {path.name}, which does not exist: the "
                              "checkpoint directory was modified by hand; fix or remove the pointer")
    return path


def write_atomically(path: Path, text: str) -> None:
    """Replace ``path`` with ``text``: a reader sees the old file or the new one, never part."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def begin_save(directory: str | Path, step: int) -> tuple[Path, Path]:
    """Collective: rank 0 makes a fresh ``iter_{step}.tmp`` (removing one left by a killed save).
    Returns (final, tmp) paths; every rank then writes into ``tmp`` and calls ``publish_save``."""
    directory = Path(directory)
    name = f"iter_{step:07d}"
    final, tmp = directory / name, directory / (name + ".tmp")
    if dist.get_rank() == 0:
        directory.mkdir(parents=True, exist_ok=True)
        if tmp.exists():  # left by a save that was killed
            shutil.rmtree(tmp)
        tmp.mkdir()
    dist.barrier()
    return final, tmp


def publish_save(final: Path, tmp: Path, keep_last: int) -> None:
    """Collective, once every rank has written into ``tmp``: rank 0 renames it to ``final``,
    points ``latest`` at it and prunes older checkpoints."""
    dist.barrier()
    if dist.get_rank() == 0:
        if final.exists():  # re-saving the same step (e.g. a signal right after a periodic save)
            shutil.rmtree(final)
        os.replace(tmp, final)
        write_atomically(final.parent / LATEST, final.name)
        _prune(final.parent, keep_last, keep=final.name)
    dist.barrier()


def save_checkpoint(directory: str | Path, model, optimizer, scheduler, train_state: TrainState,
                    data_state: dict | None, config: dict, keep_last: int = 2) -> Path:
    """Save and publish ``iter_{step}``; collective over all ranks."""
    from megatron.core import dist_checkpointing

    final, tmp = begin_save(directory, train_state.step)
    state = _sharded_state(model, optimizer, is_loading=False, with_rank_states=True,
                           rank_states={"rng": rng_state(), "data": data_state})
    state["common"] = {"train_state": asdict(train_state), "scheduler": scheduler.state_dict(),
                       "layout": _layout(), "optimizer": _optimizer_kind(optimizer),
                       "config": config}
    dist_checkpointing.save(state, str(tmp))
    publish_save(final, tmp, keep_last)
    if dist.get_rank() == 0:
        log.info("checkpoint: saved step %d to %s", train_state.step, final)
    return final


def _prune(directory: Path, keep_last: int, keep: str) -> None:
    published = sorted(p for p in directory.glob("iter_*") if p.is_dir() and not p.name.endswith(".tmp"))
    for old in published[:-keep_last] if keep_last > 0 else []:
        if old.name != keep:
            shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(path: str | Path, model, optimizer, scheduler, weights_only: bool = False):
    """Load into ``model`` (and optimizer/scheduler unless ``weights_only``).

    Returns (TrainState, this rank's data-loader state or None). RNG states are restored when the
    parallel layout matches the one saved; otherwise data order and random streams restart.
    """
    from megatron.core import dist_checkpointing

    with reading_checkpoint(path):  # a cut-off file: one line naming it, not EOFError
        common = dist_checkpointing.load_common_state_dict(str(path))["common"]
    if not weights_only and common["optimizer"] != _optimizer_kind(optimizer):
        raise RuntimeError(
            f"{path} holds {common['optimizer']} optimizer state but this run uses "
            f"{_optimizer_kind(optimizer)}: set parallel.distributed_optimizer to match, or start "
            "from its weights only with checkpoint.load_dir")
    same_layout = common["layout"] == _layout()
    with_rank_states = same_layout and not weights_only
    if not weights_only:
        # Before the template: megatron's distributed optimizer builds it by loading its own
        # state into itself (distrib_optimizer.py sharded_state_dict, is_loading), which already
        # pairs param groups the way the real load will.
        fresh_groups = group_settings(optimizer, _named(model))
        _materialise_optimizer_state(optimizer)
    template = _sharded_state(model, None if weights_only else optimizer, is_loading=True,
                              with_rank_states=with_rank_states,
                              rank_states={"rng": None, "data": None})
    if weights_only:
        # Initialising another stage's model (Stage II from Stage I): parameters the checkpoint
        # lacks keep their fresh initialisation, parameters it has and the model lacks are left.
        from megatron.core.dist_checkpointing.validation import StrictHandling

        chunks = _chunks(model)
        absent = [key for i in range(len(chunks))
                  for key in _drop_absent_factories(template[_model_key(i)], path)]
        # megatron's naming: "missing" = in the checkpoint, not asked for; "unexpected" = asked
        # for, not in the checkpoint (those keep their fresh initialisation).
        with reading_checkpoint(path):
            loaded, unused, fresh = dist_checkpointing.load(
                template, str(path), strict=StrictHandling.RETURN_ALL)
        fresh = sorted(set(fresh) | set(absent))
        for i, chunk in enumerate(chunks):
            chunk.load_state_dict(loaded[_model_key(i)], strict=not fresh)
        log.info("checkpoint: initialised weights from %s; %d tensors kept their fresh "
                 "initialisation%s; %d tensors of the checkpoint unused", path, len(fresh),
                 f" ({', '.join(fresh[:6])}{' ...' if len(fresh) > 6 else ''})" if fresh else "",
                 len(unused))
        return TrainState(), None
    with reading_checkpoint(path):
        loaded = dist_checkpointing.load(template, str(path))
    for i, chunk in enumerate(_chunks(model)):
        chunk.load_state_dict(loaded[_model_key(i)])
    optimizer.load_state_dict(loaded["optimizer"])
    scheduler.load_state_dict(common["scheduler"])
    check_groups_after_load(fresh_groups, group_settings(optimizer, _named(model)))
    data_state = None
    if with_rank_states:
        set_rng_state(loaded["rng"])
        data_state = loaded["data"]
    elif dist.get_rank() == 0:
        log.warning("checkpoint %s was saved with layout %s, loading with %s: model, optimizer "
                    "and schedule restored; data order and RNG streams restart",
                    path, common["layout"], _layout())
    state = TrainState(**common["train_state"])
    log.info("checkpoint: resumed from %s at step %d", path, state.step)
    return state, data_state
