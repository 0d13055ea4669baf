"""What the Slurm launcher tests share: reading a job's log (its losses, a line to wait for) and
the checks of a job that was signalled, requeued and resumed (``test_slurm*.py``; the cluster
itself is ``conftest.py``'s ``slurm`` fixture)."""

from __future__ import annotations

import re
import time
from pathlib import Path


def logged_losses(log_text: str) -> dict[int, float]:
    """step -> logged loss, parsed from its full repr (the last run's value for a step logged
    twice)."""
    return {int(step): float(loss)
            for step, loss in re.findall(r"step\s+(\d+) \| loss (\S+)", log_text)}


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
