"""What the Slurm launcher tests share: reading a job's log (its losses, a line to wait for) and
the checks of a job that was signalled, requeued and resumed (``test_slurm*.py``; the cluster
itself is ``conftest.py``'s ``slurm`` fixture)."""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# The #SBATCH lines of slurm/*.sbatch this cluster cannot satisfy (each refused without its
# override: several nodes, 8 tasks and 8 GPUs a node, 12 CPUs a task); --time and --signal stay.
ONE_CPU_NODE = ["--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1"]


def as_overrides(values: dict) -> list[str]:
    """``key=value`` config overrides (values as JSON) for the launcher's command line."""
    return [f"{key}={json.dumps(value)}" for key, value in values.items()]


def run_sbatch(slurm, sbatch: str, root: Path, overrides: list[str], timeout_s: float = 900,
               **env: str) -> str:
    """Submit ``slurm/<sbatch>`` from the repository root as a user does (``ONE_CPU_NODE``, the
    job's directory ``root``, ``overrides`` after the file, ``env`` e.g. CONFIG=...), wait until
    it has left the queue and return its log."""
    root.mkdir(parents=True)
    log = root / "job.log"
    options = [*ONE_CPU_NODE, f"--chdir={root}", f"--output={log}", "--open-mode=append"]
    job = slurm.sbatch([*options, str(REPO / "slurm" / sbatch), *overrides],
                       env=slurm.env(PYTHON=sys.executable, OMP_NUM_THREADS="1", **env), cwd=REPO)
    slurm.wait_until_gone(job, timeout_s=timeout_s)
    return log.read_text() if log.exists() else "(no log)"


def logged_losses(log_text: str) -> dict[int, float]:
    """step -> logged loss, parsed from its full repr (the last run's value for a step logged
    twice)."""
    return {int(step): float(loss)
            for step, loss in re.findall(r"step\s+(\d+) \| loss (\S+)", log_text)}


def saved_run(ckpt_dir: Path) -> dict:
    """The common state of the run's latest checkpoint: ``layout`` (tp, pp, cp, dp it ran at) and
    ``config`` (the whole run config, overrides applied)."""
    from megatron.core import dist_checkpointing

    latest = ckpt_dir / (ckpt_dir / "latest").read_text().strip()
    return dist_checkpointing.load_common_state_dict(str(latest))["common"]


def check_saved_layout(ckpt_dir: Path, config: str, **parallel) -> dict:
    """Assert that the run saved in ``ckpt_dir`` ran at the ``parallel`` section of the YAML
    ``config`` (relative to the repository) with ``parallel`` overridden, on two tasks (DP: what
    TP x PP x CP leaves of them; SP and the DP overlaps as set); returns the saved run config."""
    import yaml

    layout = {**yaml.safe_load((REPO / config).read_text())["parallel"], **parallel}
    tp, pp, cp = (layout[f"{kind}_parallel"] for kind in ("tensor", "pipeline", "context"))
    run = saved_run(ckpt_dir)
    assert run["layout"] == {"tp": tp, "pp": pp, "cp": cp, "dp": 2 // (tp * pp * cp)}
    saved = run["config"]["parallel"]
    for key in ("sequence_parallel", "overlap_grad_reduce", "overlap_param_gather"):
        assert saved[key] == layout.get(key, False), (key, saved[key])
    return run["config"]


def wait_for_log(path: Path, pattern: str, timeout_s: float) -> None:
    """Return once ``pattern`` appears in the file ``path``; TimeoutError with its tail if not."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.exists() and re.search(pattern, path.read_text()):
            return
        time.sleep(0.5)
    raise TimeoutError(f"{pattern!r} not in {path} after {timeout_s:.0f} s:\n"
                       + (path.read_text()[-3000:] if path.exists() else "(no log)"))


def check_uninterrupted(text: str, steps: int) -> dict[int, float]:
    """Assert that the job logging ``text`` ran on two Slurm tasks and logged steps 1..``steps``
    with unrounded losses; returns them (the reference of a pre-empted run)."""
    assert "rank 1/2 (local 1) via slurm" in text, text[-3000:]
    losses = logged_losses(text)
    assert sorted(losses) == list(range(1, steps + 1)), text[-3000:]
    assert len(re.search(r"loss (\S+)", text).group(1)) > 10, "losses logged rounded"
    return losses


def check_requeued_and_resumed(text: str, run_dir: Path, steps: int,
                               reference: dict[int, float]) -> int:
    """Assert that the job logging ``text`` (run in ``run_dir``, checkpoints in ``run_dir/ckpt``)
    got USR1, stopped every rank at a step before ``steps`` with a checkpoint, was requeued,
    resumed from that checkpoint, finished at ``steps``, and logged the uninterrupted run's
    losses ``reference``, every step and all digits. Returns the step it stopped at."""
    assert "USR1 received" in text and "requeueing job" in text, text[-3000:]
    stop = re.search(r"stopping at step (\d+) on signal \(checkpoint saved\)", text)
    assert stop and int(stop.group(1)) < steps, text[-3000:]
    stop = int(stop.group(1))
    assert re.search(rf"resumed from \S+iter_{stop:07d} at step", text), text[-3000:]
    assert (run_dir / "ckpt" / "latest").read_text().strip().endswith(f"iter_{steps:07d}")
    assert not list(run_dir.glob(".finevit-requeue-*")), "marker left behind"
    assert logged_losses(text) == reference
    return stop
