"""A signal during start-up, as a user's job gets it (``python -m megatron_finevit.train`` in real
processes): it is recorded from the top of ``main()``, never fatal, and honoured by every rank
together at the first safe point (right before the first step). Nothing was trained, so nothing is
saved; every rank exits 3, and the requeue marker says so (``slurm/launch.sh`` requeues on it).

The oracle is the process table: before, the signalled rank died with the default action (exit
138 for SIGUSR1) and the others hung in a collective until the gloo timeout.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from megatron_finevit.training.preemption import REQUEUE_MARKER_ENV

EXIT_TIMEOUT_S = 120  # a hang (the bug) fails here, minutes before the gloo timeout

CONFIG = """\
stage: toy_lm
train_steps: 3
global_batch_size: 4
precision: fp32
optim: {{lr: 3.0e-3, warmup_steps: 1}}
checkpoint: {{dir: {ckpt}}}
logging: {{log_interval: 1, progress_bar: false}}
eval: {{at_start: false, at_end: false}}
stage_config: {{num_layers: 2{extra}}}
"""

# The trainer started as main() starts it, with SIGTERM raised right before torch.distributed is
# initialised (the init is where a real job spends its first seconds, after the imports).
SIGNAL_BEFORE_INIT = """\
import os, signal, sys
import megatron_finevit.platform as platform
from megatron_finevit import train

init_distributed = platform.init_distributed

def signal_then_init(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGTERM)
    return init_distributed(*args, **kwargs)

platform.init_distributed = signal_then_init
sys.exit(train.main(sys.argv[1:]))
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Rank:
    """One trainer process of a world started by hand (what torchrun would set), logs in files."""

    def __init__(self, tmp: Path, rank: int, world_size: int, port: int, entry: list[str]):
        self.tmp, self.rank = tmp, rank
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        env.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
                   **{REQUEUE_MARKER_ENV: str(tmp / "requeue")})
        self.stdout, self.stderr = tmp / f"rank{rank}.out", tmp / f"rank{rank}.err"
        with open(self.stdout, "w") as out, open(self.stderr, "w") as err:
            self.proc = subprocess.Popen([sys.executable, *entry, "--config", str(tmp / "run.yaml")],
                                         env=env, stdout=out, stderr=err)

    def logs(self) -> str:
        return (f"--- rank {self.rank} stdout\n{self.stdout.read_text()[-2000:]}\n"
                f"--- rank {self.rank} stderr\n{self.stderr.read_text()[-3000:]}")


def _start_world(tmp: Path, world_size: int, entry: list[str], extra: str = "") -> list[Rank]:
    (tmp / "run.yaml").write_text(CONFIG.format(ckpt=tmp / "ckpt", extra=extra))
    port = _free_port()
    return [Rank(tmp, r, world_size, port, entry) for r in range(world_size)]


def _wait_until(ranks: list[Rank], condition, what: str, timeout_s: float) -> None:
    """Poll ``condition()``; fail (killing the world) if a rank exits first or time runs out."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        exited = [r for r in ranks if r.proc.poll() is not None]
        if exited or time.monotonic() > deadline:
            _kill(ranks)
            why = f"rank {exited[0].rank} exited {exited[0].proc.returncode}" if exited else \
                f"{timeout_s:.0f} s passed"
            raise AssertionError(f"{why} before {what}\n" + "\n".join(r.logs() for r in ranks))
        time.sleep(0.1)


def _exit_codes(ranks: list[Rank], timeout_s: float) -> list[int]:
    deadline = time.monotonic() + timeout_s
    try:
        return [r.proc.wait(timeout=max(deadline - time.monotonic(), 0.1)) for r in ranks]
    except subprocess.TimeoutExpired:
        _kill(ranks)
        raise AssertionError(f"a rank still runs {timeout_s:.0f} s after the gate opened (hang)\n"
                             + "\n".join(r.logs() for r in ranks))


def _kill(ranks: list[Rank]) -> None:
    for r in ranks:
        if r.proc.poll() is None:
            r.proc.kill()
            r.proc.wait()


def test_signal_during_model_build_stops_every_rank_with_exit_3(tmp_path):
    gate = tmp_path / "gate"
    ranks = _start_world(tmp_path, 2, ["-m", "megatron_finevit.train"],
                         extra=f", build_gate: {gate}")
    # both ranks are inside build_model (distributed is up, the model not yet built)
    _wait_until(ranks, lambda: all(Path(f"{gate}.rank{r.rank}").exists() for r in ranks),
                "both ranks reached the model build", timeout_s=300)
    os.kill(ranks[1].proc.pid, signal.SIGUSR1)  # one rank only, as a stray or early signal
    _wait_until(ranks, lambda: "received SIGUSR1" in ranks[1].stderr.read_text(),
                "rank 1 recorded the signal", timeout_s=60)
    gate.touch()
    codes = _exit_codes(ranks, EXIT_TIMEOUT_S)
    logs = "\n".join(r.logs() for r in ranks)
    assert codes == [3, 3], logs
    # the logging rank (the last) says why; nothing was trained, so nothing was saved
    assert "stopping at step 0 on signal (no checkpoint saved)" in ranks[1].stdout.read_text(), logs
    assert not (tmp_path / "ckpt" / "latest").exists(), logs
    assert "step 0" in (tmp_path / "requeue").read_text(), logs


def test_signal_before_distributed_init_is_recorded_not_fatal(tmp_path):
    ranks = _start_world(tmp_path, 1, ["-c", SIGNAL_BEFORE_INIT])
    codes = _exit_codes(ranks, EXIT_TIMEOUT_S + 60)  # includes the start-up (imports)
    logs = ranks[0].logs()
    assert codes == [3], logs
    assert "received SIGTERM" in logs and "stopping at step 0 on signal" in logs, logs
    assert not (tmp_path / "ckpt" / "latest").exists(), logs
    assert (tmp_path / "requeue").exists(), logs
