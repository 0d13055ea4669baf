"""The Slurm launcher on a real single-node Slurm cluster (``testing.local_slurm``): a batch job
runs ``slurm/launch.sh`` with two srun tasks that form one gloo world from the Slurm environment;
USR1 sent to the batch shell (what ``#SBATCH --signal=B:USR1@N`` does before the time limit) makes
every task checkpoint and exit with code 3, the launcher requeues the job on the trainer's marker,
and the requeued run resumes from ``latest`` and logs the uninterrupted job's losses, bit for bit.

Task 1 exits last on purpose (``LINGERING_PYTHON``), so srun's own exit status is not 3: the
requeue must not depend on which rank exits first.

Skipped where Slurm is not installed or we are not root (``tools/setup_env.sh`` installs it when
run as root with apt, as in CI).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
from slurm_jobs import check_requeued_and_resumed, check_uninterrupted, wait_for_log

from megatron_finevit.testing.local_slurm import LocalSlurm, missing

REPO = Path(__file__).resolve().parents[2]
STEPS = 20
LINGER_S = 10

pytestmark = pytest.mark.skipif(missing() is not None, reason=str(missing()))

CONFIG = """\
stage: toy_lm
train_steps: {steps}
global_batch_size: 4
precision: fp32
parallel: {{distributed_optimizer: true}}
optim: {{lr: 3.0e-3, warmup_steps: 2}}
checkpoint: {{dir: {ckpt}}}
logging: {{log_interval: 1, progress_bar: false}}
eval: {{at_start: false, at_end: false}}
stage_config: {{num_layers: 2, step_sleep_s: 0.25}}
"""

# Task 1 lingers after its trainer exits, so task 0 always exits first and srun then ends task 1
# (--kill-on-bad-exit): the normal case on a cluster with thousands of ranks, made deterministic
# here. The trap keeps the forwarded USR1 from killing this wrapper (the trainer below gets it from
# slurmstepd too); srun's SIGTERM still ends it, as it would a rank slow to exit.
LINGERING_PYTHON = """\
#!/usr/bin/env bash
trap : USR1
{python} "$@"; rc=$?
if [[ $SLURM_PROCID == 1 ]]; then sleep {linger_s}; fi
exit $rc
"""

JOB = """\
#!/usr/bin/env bash
#SBATCH --job-name=finevit-test
#SBATCH --ntasks=2
#SBATCH --cpus-per-task=1
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output={log}
exec {repo}/slurm/launch.sh {config}
"""


def _submit(slurm: LocalSlurm, root: Path, linger_s: float = 0) -> tuple[int, Path]:
    root.mkdir()
    config = root / "run.yaml"
    config.write_text(CONFIG.format(steps=STEPS, ckpt=root / "ckpt"))
    log = root / "job.log"
    job = root / "job.sbatch"
    job.write_text(JOB.format(log=log, repo=REPO, config=config))
    python = root / "python.sh"
    python.write_text(LINGERING_PYTHON.format(python=sys.executable, linger_s=linger_s))
    python.chmod(0o755)
    env = slurm.env(PYTHON=str(python), OMP_NUM_THREADS="1")
    return slurm.sbatch([f"--chdir={root}", str(job)], env=env), log


def test_preempted_job_is_requeued_and_resumes(slurm, tmp_path):
    # the uninterrupted job: the reference losses
    job, log = _submit(slurm, tmp_path / "uninterrupted")
    slurm.wait_until_gone(job, timeout_s=240)
    reference = check_uninterrupted(log.read_text(), STEPS)

    # The same job, signalled as Slurm signals it before the time limit. Task 1 lingers so that
    # srun reports its kill, not the trainer's 3; once in a while srun still reports 3 (both
    # tasks' exits race inside slurmstepd), and then the race this test is about was not forced:
    # that attempt is checked all the same and the job submitted once more.
    for attempt in range(2):
        root = tmp_path / f"preempted{attempt}"
        job, log = _submit(slurm, root, linger_s=LINGER_S)
        wait_for_log(log, r"step\s+5 \|", timeout_s=120)
        slurm.run(["scancel", "--batch", "--signal=USR1", str(job)])
        slurm.wait_until_gone(job, timeout_s=240)
        text = log.read_text()
        # the resumed run ends exactly as the uninterrupted one: every step's loss, all digits
        check_requeued_and_resumed(text, root, STEPS, reference)
        srun_rc = re.search(r"launch.sh: srun exited (\d+)", text)
        assert srun_rc, text[-3000:]
        if int(srun_rc.group(1)) != 3:
            break
    assert int(srun_rc.group(1)) != 3, "task 1 did not exit last, twice: " + text[-3000:]
