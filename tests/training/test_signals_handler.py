"""The pre-emption handler's lifetime, in a fresh interpreter (signal dispositions are process
state): a run's own handler gives the signals back when the run ends; an entry point's handler
outlives the run, so a signal while a rank exits (srun's SIGTERM once another rank has exited 3)
is recorded, not fatal; the requeue marker is written whole; ``save_on_signal: false`` gives the
signals back their default action. The oracle is ``signal.getsignal`` and the process surviving.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from megatron_finevit.training.preemption import REQUEUE_MARKER_ENV

LIFETIME = """\
import json, os, signal
from megatron_finevit.training import preemption

out = {}
run = preemption.handler_for_run(True)  # library use: no entry point installed one
os.kill(os.getpid(), signal.SIGUSR1)
out["run_received"] = run.received
run.release()
out["after_run_release_default"] = signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL

process = preemption.install_process_handler()  # what main() does first
out["idempotent"] = preemption.install_process_handler() is process
out["run_gets_process_handler"] = preemption.handler_for_run(True) is process
process.release()  # the run ends ...
os.kill(os.getpid(), signal.SIGTERM)  # ... and srun ends this rank while it exits
out["after_release_received"] = process.received
out["should_stop_without_distributed"] = process.should_stop()
process.confirm_stop("stopped on a signal at step 7 (checkpoint saved)")
out["consumed"] = process.received is None

out["disabled_returns"] = preemption.handler_for_run(False)
out["disabled_default"] = signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
print(json.dumps(out))
"""


def test_handler_lifetime_and_marker(tmp_path):
    marker = tmp_path / "requeue"
    env = {**os.environ, REQUEUE_MARKER_ENV: str(marker)}
    done = subprocess.run([sys.executable, "-c", LIFETIME], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out == {
        "run_received": 10, "after_run_release_default": True,  # 10: SIGUSR1
        "idempotent": True, "run_gets_process_handler": True,
        "after_release_received": 15, "should_stop_without_distributed": True,  # 15: SIGTERM
        "consumed": True, "disabled_returns": None, "disabled_default": True,
    }, done.stderr
    assert marker.read_text() == "stopped on a signal at step 7 (checkpoint saved)\n"
    assert [p.name for p in tmp_path.iterdir()] == ["requeue"]  # no temporary file left
