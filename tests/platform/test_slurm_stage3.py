"""``slurm/stage3_align.sbatch`` itself on the local Slurm cluster (``testing.local_slurm``).

The file is submitted as a user submits it, from the repository root, with two kinds of
command-line arguments: sbatch options that override its ``#SBATCH`` lines for this one-node,
two-CPU, GPU-less cluster (``ONE_CPU_NODE``), and, after the file, config overrides that the
launcher passes on top of ``examples/stage3_align.yaml`` to make the paper's recipe tiny
(``tiny_overrides``: the models, packs and data of ``testing.stage_assets.tiny_align_run``, the
LLM initialised from a converted random Qwen3). The job trains on two srun tasks (DP=2) to the end
and saves a checkpoint; the same job signalled with USR1 mid-run (what ``--signal=B:USR1@180``
does before the time limit) checkpoints, is requeued, resumes and logs the uninterrupted job's
losses, bit for bit.

Skipped where Slurm is not installed or we are not root (as ``test_slurm.py``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from slurm_jobs import check_requeued_and_resumed, check_uninterrupted, wait_for_log

from megatron_finevit.testing.local_slurm import LocalSlurm, missing
from megatron_finevit.testing.stage_assets import make_align_assets, tiny_align_run

REPO = Path(__file__).resolve().parents[2]
SBATCH = REPO / "slurm" / "stage3_align.sbatch"
STEPS = 20

pytestmark = pytest.mark.skipif(missing() is not None, reason=str(missing()))

# The #SBATCH lines this cluster cannot satisfy (each refused without its override: 16 nodes, 8
# tasks and 8 GPUs a node, 12 CPUs a task); --time and --signal stay as written.
ONE_CPU_NODE = ["--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_align_assets(tmp_path_factory.mktemp("align_assets"), num_eval=4)


def tiny_overrides(assets: dict, ckpt: Path) -> list[str]:
    """Config overrides turning examples/stage3_align.yaml into a tiny fp32 CPU run: the models
    and data of ``tiny_align_run`` (each ``stage_config`` entry replaces the YAML's whole value,
    so the ``te`` specs go), no Stage II encoder (random init), the tiny LLM, the bundled Qwen
    tokenizer, no evaluation; the YAML's parallel layout, optimiser and policies stay."""
    tiny = tiny_align_run(assets, STEPS)
    stage = {**tiny.stage_config, "vit_init_dir": None, "llm_init_dir": assets["llm_init"],
             "tokenizer_dir": None, "eval_data_dir": None}
    values = {"train_steps": STEPS, "global_batch_size": tiny.global_batch_size,
              "precision": tiny.precision, "optim.lr": 1e-3, "optim.warmup_steps": 0,
              "checkpoint.dir": str(ckpt), "logging.log_interval": 1,
              "logging.tensorboard_dir": None, "logging.progress_bar": False,
              "eval.at_start": False, "eval.at_end": False,
              **{f"stage_config.{key}": value for key, value in stage.items()}}
    return [f"{key}={json.dumps(value)}" for key, value in values.items()]


def _submit(slurm: LocalSlurm, root: Path, assets: dict) -> tuple[int, Path]:
    root.mkdir()
    log = root / "job.log"
    options = [*ONE_CPU_NODE, f"--chdir={root}", f"--output={log}", "--open-mode=append"]
    env = slurm.env(PYTHON=sys.executable, OMP_NUM_THREADS="1")
    job = slurm.sbatch([*options, str(SBATCH), *tiny_overrides(assets, root / "ckpt")], env=env,
                       cwd=REPO)
    return job, log


def test_stage3_sbatch_trains_and_resumes_after_preemption(slurm, assets, tmp_path):
    # the uninterrupted job: trains to the end, saves, and gives the reference losses
    job, log = _submit(slurm, tmp_path / "uninterrupted", assets)
    slurm.wait_until_gone(job, timeout_s=300)
    text = log.read_text()
    reference = check_uninterrupted(text, STEPS)
    assert "loss_" in text and "image tokens/s" in text, text[-3000:]  # the align stage's metrics
    assert (tmp_path / "uninterrupted" / "ckpt" / "latest").read_text().strip().endswith(
        f"iter_{STEPS:07d}")

    # the same job, signalled as Slurm signals it before the time limit
    job, log = _submit(slurm, tmp_path / "preempted", assets)
    wait_for_log(log, r"step\s+1 \|", timeout_s=240)
    slurm.run(["scancel", "--batch", "--signal=USR1", str(job)])
    slurm.wait_until_gone(job, timeout_s=300)
    check_requeued_and_resumed(log.read_text(), tmp_path / "preempted", STEPS, reference)
