"""Checkpoints of the DeepSpeed engine: DeepSpeed's own format, published atomically like ours.

Layout of ``checkpoint.dir`` (the same protocol as ``checkpointing.py``)::

    iter_0000100/                            a published checkpoint
        mp_rank_00_model_states.pt           DeepSpeed: module weights (written by DP rank 0)
        zero_pp_rank_{r}_mp_rank_00_optim_states.pt   DeepSpeed: ZeRO-2 partition of rank r
        rank_{r:05d}_train_state.pt          ours: RNG, data-loader position, train state, LR
                                             schedule of rank r
        run_config.json                      the run config (for the record)
    latest                                   text file: the newest published checkpoint
    zero_to_fp32.py, zero_to_torch.py        DeepSpeed's scripts to export full fp32 weights

Every rank writes into ``iter_N.tmp`` (DeepSpeed's ``save_checkpoint`` with that tag and
``save_latest=False``); rank 0 then renames it and moves ``latest``. ZeRO-2 optimiser partitions
belong to the data-parallel size they were saved at: resuming needs the same size, while
``checkpoint.load_dir`` (weights only) works at any.

DeepSpeed reads its own files with ``torch.load(weights_only=False)`` (they hold its config):
load DeepSpeed checkpoints only from trusted places. Our per-rank files hold plain data and
tensors and are read with ``weights_only=True``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_finevit.training.checkpointing import (
    TrainState,
    begin_save,
    publish_save,
    rng_state,
    set_rng_state,
)

log = logging.getLogger(__name__)

MODEL_STATES = "mp_rank_00_model_states.pt"


def _rank_file(path: Path, rank: int) -> Path:
    return path / f"rank_{rank:05d}_train_state.pt"


def is_deepspeed_checkpoint(path: str | Path) -> bool:
    return (Path(path) / MODEL_STATES).is_file()


def save_deepspeed_checkpoint(directory: str | Path, engine, scheduler, train_state: TrainState,
                              data_state: dict, config, keep_last: int = 2) -> Path:
    """Save and publish ``iter_{step}``; collective over all ranks."""
    final, tmp = begin_save(directory, train_state.step)
    engine.save_checkpoint(str(tmp.parent), tag=tmp.name, save_latest=False)
    rank = dist.get_rank()
    torch.save({"rng": rng_state(), "data": data_state, "train_state": asdict(train_state),
                "scheduler": scheduler.state_dict(), "world_size": dist.get_world_size()},
               _rank_file(tmp, rank))
    if rank == 0:
        (tmp / "run_config.json").write_text(json.dumps(asdict(config), indent=1))
    publish_save(final, tmp, keep_last)
    if rank == 0:
        log.info("checkpoint: saved step %d to %s (deepspeed)", train_state.step, final)
    return final


def load_deepspeed_checkpoint(path: str | Path, engine, scheduler, weights_only: bool = False):
    """Resume from ``path`` (weights, ZeRO-2 optimiser partitions, LR schedule, RNG, data-loader
    position), or with ``weights_only`` load just the module weights (any data-parallel size).
    Returns (TrainState, this rank's data-loader state or None)."""
    path = Path(path)
    if weights_only:
        loaded, _ = engine.load_checkpoint(str(path.parent), tag=path.name, load_module_only=True)
        if loaded is None:
            raise FileNotFoundError(f"{path} is not a DeepSpeed checkpoint")
        log.info("checkpoint: initialised weights from %s (deepspeed)", path)
        return TrainState(), None
    # Every rank checks rank 0's file first, so all fail alike before any collective.
    saved_world = torch.load(_rank_file(path, 0), weights_only=True)["world_size"]
    if saved_world != dist.get_world_size():
        raise RuntimeError(
            f"{path} was saved by {saved_world} data-parallel ranks, this run has "
            f"{dist.get_world_size()}: ZeRO-2 optimiser partitions cannot be resumed at another "
            "size; resume with the same number of ranks, or start from its weights only with "
            "checkpoint.load_dir")
    ours = torch.load(_rank_file(path, dist.get_rank()), weights_only=True)
    loaded, _ = engine.load_checkpoint(str(path.parent), tag=path.name)
    if loaded is None:
        raise FileNotFoundError(f"{path} is not a DeepSpeed checkpoint")
    scheduler.load_state_dict(ours["scheduler"])
    set_rng_state(ours["rng"])
    state = TrainState(**ours["train_state"])
    log.info("checkpoint: resumed from %s at step %d (deepspeed)", path, state.step)
    return state, ours["data"]
