"""Distributed initialisation from torchrun's or Slurm's environment.

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT. Under ``srun`` (one
task per GPU) we read SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID, take the first host of
SLURM_JOB_NODELIST as the rendezvous address and derive the port from the job id, so every task of
a job agrees on both without any launcher script. A process started without a launcher is a
world of one on a free port.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from megatron_finevit.platform.device import Backend, detect_backend

log = logging.getLogger(__name__)

# Ports 20000-29999: above the usual service range, below Linux's ephemeral range (32768+).
_SLURM_PORT_BASE = 20000
_SLURM_PORT_SPAN = 10000


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str  # "torchrun", "slurm" or "single"


def expand_slurm_nodelist(nodelist: str) -> list[str]:
    """Expand Slurm's compressed host list: 'gpu[001-003,007],login1' -> [gpu001, gpu002, gpu003,
    gpu007, login1]. Zero padding of ranges is kept, as ``scontrol show hostnames`` does; a name
    may hold several bracket groups and text after them ('r[1-2]-n[1-2]' -> r1-n1, r1-n2, r2-n1,
    r2-n2, the last group varying fastest, as Slurm's hostlist does)."""
    hosts = [host for name in _split_outside_brackets(nodelist) for host in _expand_name(name)]
    if not hosts:
        raise ValueError(f"could not parse SLURM_JOB_NODELIST={nodelist!r}")
    return hosts


def _split_outside_brackets(nodelist: str) -> list[str]:
    """The comma-separated names of ``nodelist``; commas inside ``[...]`` separate ranges."""
    names, depth, current = [], 0, ""
    for char in nodelist:
        depth += {"[": 1, "]": -1}.get(char, 0)
        if not 0 <= depth <= 1:
            raise ValueError(f"unbalanced brackets in SLURM_JOB_NODELIST={nodelist!r}")
        if char == "," and depth == 0:
            names.append(current)
            current = ""
        else:
            current += char
    if depth:
        raise ValueError(f"unbalanced brackets in SLURM_JOB_NODELIST={nodelist!r}")
    return [name.strip() for name in names + [current] if name.strip()]


def _expand_name(name: str) -> list[str]:
    """One name with any number of ``[ranges]`` groups: their cartesian product, in order."""
    expanded = [""]
    for text, ranges in re.findall(r"([^\[]*)(?:\[([^\]]*)\])?", name):
        values = _expand_ranges(ranges, name) if ranges else [""]
        expanded = [head + text + value for head in expanded for value in values]
    return expanded


def _expand_ranges(ranges: str, name: str) -> list[str]:
    """'001-003,7' -> ['001', '002', '003', '7'] (each range keeps its low end's width)."""
    values = []
    for part in ranges.split(","):
        lo, _, hi = part.strip().partition("-")
        if not lo.isdigit() or (hi and not hi.isdigit()):
            raise ValueError(f"bad range {part!r} in Slurm host list name {name!r}")
        if not hi:
            values.append(lo)
            continue
        values += [f"{value:0{len(lo)}d}" for value in range(int(lo), int(hi) + 1)]
    return values


def slurm_port(job_id: str) -> int:
    """A rendezvous port that all tasks of one job derive identically from its id."""
    return _SLURM_PORT_BASE + int(job_id) % _SLURM_PORT_SPAN


def dist_env_from_environ(environ: dict[str, str] | None = None) -> DistEnv:
    """Read the launcher's environment. torchrun's variables win over Slurm's (torchrun inside an
    allocation is common); with neither we are a single process."""
    env = dict(os.environ if environ is None else environ)
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistEnv(
            rank=int(env["RANK"]),
            world_size=int(env["WORLD_SIZE"]),
            local_rank=int(env.get("LOCAL_RANK", 0)),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT", 29500)),
            launcher="torchrun",
        )
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        missing = [k for k in ("SLURM_JOB_ID", "SLURM_JOB_NODELIST") if k not in env]
        if missing:
            raise RuntimeError(f"Slurm task without {missing}: launch with srun inside sbatch/salloc")
        return DistEnv(
            rank=int(env["SLURM_PROCID"]),
            world_size=int(env["SLURM_NTASKS"]),
            local_rank=int(env.get("SLURM_LOCALID", 0)),
            master_addr=env.get("MASTER_ADDR") or expand_slurm_nodelist(env["SLURM_JOB_NODELIST"])[0],
            master_port=int(env.get("MASTER_PORT") or slurm_port(env["SLURM_JOB_ID"])),
            launcher="slurm",
        )
    # One process meets no one: port 0 lets the OS pick a free one. A fixed default (29500) made
    # two single-process runs on one machine (an evaluation beside a training) collide.
    return DistEnv(0, 1, 0, "127.0.0.1", int(env.get("MASTER_PORT", 0)), "single")


def collective_device() -> torch.device:
    """Where tensors for torch.distributed collectives must live: this process's GPU under NCCL
    (it reduces CUDA tensors only), the CPU under gloo."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def init_distributed(backend: Backend | None = None, timeout_minutes: float = 10.0,
                     environ: dict[str, str] | None = None) -> DistEnv:
    """Initialise torch.distributed (idempotent) and, on CUDA, bind this process to its GPU."""
    backend = backend or detect_backend()
    env = dist_env_from_environ(environ)
    if not 0 <= env.rank < env.world_size:
        raise RuntimeError(f"rank {env.rank} is outside world size {env.world_size}")
    if dist.is_initialized():
        if dist.get_world_size() != env.world_size or dist.get_rank() != env.rank:
            raise RuntimeError("torch.distributed is already initialised with another rank/world size")
        return env
    if backend.device_type == "cuda":
        torch.cuda.set_device(env.local_rank % torch.cuda.device_count())
    else:
        from megatron_finevit.platform.megatron_cpu_compat import apply_cpu_compat

        apply_cpu_compat()
    dist.init_process_group(
        backend=backend.dist_backend,
        init_method=f"tcp://{env.master_addr}:{env.master_port}",
        rank=env.rank,
        world_size=env.world_size,
        timeout=timedelta(minutes=timeout_minutes),
    )
    log.info("distributed: rank %d/%d (local %d) via %s, backend %s, rendezvous %s:%d",
             env.rank, env.world_size, env.local_rank, env.launcher, backend.dist_backend,
             env.master_addr, env.master_port)
    return env
