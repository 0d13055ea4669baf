"""Run a function on N gloo ranks in child processes (the multi-rank test harness).

    results = run_world(check_fn, world_size=2, args=(cfg,), timeout_s=300)

``check_fn(rank, world_size, *args)`` runs on every rank after torch.distributed (gloo) is up and
the megatron-core CPU layer is applied; its return values come back as a list indexed by rank
(they cross the process boundary through ``torch.save`` / ``torch.load(weights_only=True)``, so
return plain Python values and CPU tensors).

- An exception on any rank fails the call with that rank's traceback in the message.
- A hung collective fails by ``timeout_s`` instead of hanging CI: every rank is killed.
- A rank killed by a signal (a segfault in a native library) fails the call with the Python
  stack of each of its threads at that moment (``faulthandler``), not only its exit code.
- Ranks fork from the process's forkserver (``platform.forkserver``; spawned where there is
  none), which has imported torch and megatron-core once (``RANK_PRELOAD``), so ranks no longer
  pay megatron's ~7 s import each. A rank runs with the caller's environment at the time of the
  call, as under spawn.
- One world can run many checks: put them in one function and return a dict of results, so a
  world's start-up and process-group set-up are paid once rather than once per check.
"""

from __future__ import annotations

import faulthandler
import io
import os
import shutil
import tempfile
import traceback
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.multiprocessing  # noqa: F401 - registers torch's reductions for the result queue

from megatron_finevit.platform.forkserver import forkserver_context

# What every rank imports, loaded once in the forkserver the ranks fork from: megatron-core's
# import alone is ~7 s of CPU on the 2-core CI machine, once per rank of every world under spawn.
# (Imported, not applied: each rank applies the CPU compatibility layer itself, as before.)
RANK_PRELOAD = ["torch.distributed", "megatron.core.parallel_state", "megatron.core.tensor_parallel",
                "megatron.core.models.gpt", "megatron.core.pipeline_parallel",
                "megatron.core.optimizer", "megatron.core.distributed",
                "megatron.core.dist_checkpointing",
                "megatron_finevit.platform.megatron_cpu_compat"]


@dataclass(frozen=True)
class Layout:
    """A parallel layout for a parity check, in short names (``Layout(tp=2, sp=True)``)."""

    tp: int = 1
    pp: int = 1
    cp: int = 1
    sp: bool = False

    @property
    def label(self) -> str:
        return f"tp{self.tp}_pp{self.pp}_cp{self.cp}" + ("_sp" if self.sp else "")

    def parallel_config(self):
        from megatron_finevit.platform import ParallelConfig

        return ParallelConfig(tensor_parallel=self.tp, pipeline_parallel=self.pp,
                              context_parallel=self.cp, sequence_parallel=self.sp)


class RankFailure(RuntimeError):
    """A rank of a spawned world raised; the message holds its traceback."""


def _rank_main(rank: int, world_size: int, store_path: str, fn: Callable, args: tuple,
               queue, environ: dict[str, str]) -> None:
    # the forkserver's environment is the one it started with: take the caller's, as spawn does
    os.environ.clear()
    os.environ.update(environ)
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
        # One BLAS thread per rank: ranks share the machine's cores.
        OMP_NUM_THREADS=os.environ.get("MULTIRANK_THREADS", "1"),
    )
    # A native crash kills the rank before it can report: leave its threads' stacks behind.
    fault_log = open(_fault_log_path(store_path, rank), "w")  # noqa: SIM115 - lives as long as the rank
    faulthandler.enable(file=fault_log, all_threads=True)
    try:
        import torch
        import torch.distributed as dist

        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
        from megatron_finevit.platform.megatron_cpu_compat import apply_cpu_compat

        apply_cpu_compat()
        # Rendezvous through a file, not a TCP port picked in advance: a port found free by the
        # parent can be taken by another world before rank 0 binds it (seen with parallel runs).
        dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank,
                                world_size=world_size, timeout=timedelta(minutes=5))
        # Every rank past its connection set-up before any may finish: a rank whose fn returns
        # at once could otherwise exit while another still connects to it ("Gloo
        # connectFullMesh failed ... Connection closed by peer", ~1 in 60 trivial worlds once
        # ranks forked in a fraction of a second)
        dist.barrier()
        try:
            result = fn(rank, world_size, *args)
        finally:
            from megatron.core import parallel_state

            if parallel_state.model_parallel_is_initialized():
                parallel_state.destroy_model_parallel()
            dist.destroy_process_group()
        buffer = io.BytesIO()
        torch.save(result, buffer)  # read back with weights_only=True: plain data and tensors only
        queue.put((rank, "ok", buffer.getvalue()))
    except BaseException:  # noqa: BLE001 - report anything, including SystemExit
        queue.put((rank, "error", traceback.format_exc()))


def _fault_log_path(store_path: str, rank: int) -> str:
    return f"{store_path}.fault.{rank}"


def _crash_report(store_path: str, rank: int, exitcode: int) -> str:
    """What a rank that died without reporting left behind: its exit code and, when a signal
    killed it, the stacks ``faulthandler`` wrote."""
    try:
        with open(_fault_log_path(store_path, rank)) as f:
            stacks = f.read().strip()
    except OSError:
        stacks = ""
    return (f"process exited with code {exitcode} without reporting"
            + (f"; its threads when it died:\n{stacks}" if stacks else ""))


def run_world(fn: Callable[..., Any], world_size: int, args: tuple = (), timeout_s: float = 300.0) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` spawned gloo ranks; see module doc."""
    ctx = forkserver_context(RANK_PRELOAD)
    queue = ctx.Queue()
    store_dir = tempfile.mkdtemp(prefix="multirank_")
    store_path = os.path.join(store_dir, "store")
    procs = [ctx.Process(target=_rank_main,
                         args=(r, world_size, store_path, fn, args, queue, dict(os.environ)),
                         daemon=False)
             for r in range(world_size)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors: dict[int, str] = {}
    import queue as queue_lib
    import time

    deadline = time.monotonic() + timeout_s
    try:
        while len(results) + len(errors) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                if errors:
                    break
                missing = sorted(set(range(world_size)) - set(results) - set(errors))
                raise TimeoutError(
                    f"ranks {missing} of a {world_size}-rank world did not finish within "
                    f"{timeout_s:.0f} s (a hung collective?)" + _format_errors(errors))
            try:
                rank, status, payload = queue.get(timeout=min(remaining, 1.0))
            except queue_lib.Empty:
                dead = [r for r, p in enumerate(procs)
                        if not p.is_alive() and p.exitcode not in (0, None)
                        and r not in results and r not in errors]
                for r in dead:
                    errors[r] = _crash_report(store_path, r, procs[r].exitcode)
                if errors and not any(p.is_alive() for p in procs):
                    break
                continue
            if status == "ok":
                results[rank] = torch.load(io.BytesIO(payload), weights_only=True)
            else:
                errors[rank] = payload
            if errors:
                # One rank failed: the others are likely blocked in a collective; give them a
                # short grace period to report their own error, then stop.
                deadline = min(deadline, time.monotonic() + 10.0)
    finally:
        for p in procs:
            p.join(timeout=1.0 if (errors or len(results) < world_size) else 30.0)
            if p.is_alive():
                p.kill()
                p.join()
        shutil.rmtree(store_dir, ignore_errors=True)
    if errors:
        raise RankFailure(f"{len(errors)} of {world_size} ranks failed:" + _format_errors(errors))
    return [results[r] for r in range(world_size)]


def _format_errors(errors: dict[int, str]) -> str:
    return "".join(f"\n--- rank {r} ---\n{tb}" for r, tb in sorted(errors.items()))


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie or a dead process does not; Linux ``/proc``)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] not in "ZX"
    except FileNotFoundError:
        return False
