"""``slurm/stage1_mim.sbatch`` and ``slurm/stage2_contrastive.sbatch`` themselves on the local
Slurm cluster (``testing.local_slurm``), chained as the recipes chain: Stage II starts from the
Stage I job's checkpoint (``checkpoint.load_dir``, as ``examples/stage2_contrastive.yaml``).

Each file is submitted as a user submits it (``slurm_jobs.run_sbatch``: one node, two tasks, the
file's YAML made tiny by config overrides — the models, packs and data of
``testing.stage_assets.tiny_run``, fp32, a fixed number of packs a step instead of the paper's
``samples_per_step``, no evaluation). The YAML's parallel layout stays (Stage I's PP2, so DP1 on
two tasks; Stage II's DP), and so do its stage settings that fit a tiny run (mask ratio, loss
scope, the text tower's freeze). Every job trains ``STEPS`` steps on both tasks, logs each
step's loss and saves its last step.

Skipped where Slurm is not installed or we are not root (as ``test_slurm.py``).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from slurm_jobs import as_overrides, check_saved_layout, check_uninterrupted, run_sbatch

from megatron_finevit.testing.local_slurm import missing
from megatron_finevit.testing.stage_assets import make_stage_assets, tiny_run

STEPS = 4

pytestmark = pytest.mark.skipif(missing() is not None, reason=str(missing()))


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_stage_assets(tmp_path_factory.mktemp("stages12_assets"), num_train=64,
                             num_eval=4)


def tiny_overrides(stage: str, assets: dict, ckpt: Path, **values) -> list[str]:
    """Config overrides turning the stage's paper YAML into a tiny fp32 CPU run of ``STEPS``
    steps: each ``stage_config`` entry of ``tiny_run`` replaces the YAML's whole value (so the
    ``te`` specs and the paper's data go); ``values`` on top."""
    tiny = tiny_run(stage, assets, STEPS)
    return as_overrides({
        "train_steps": STEPS, "samples_per_step": 0, "global_batch_size": tiny.global_batch_size,
        "precision": tiny.precision, "optim.lr": tiny.optim.lr, "optim.warmup_steps": 0,
        "checkpoint.dir": str(ckpt), "logging.log_interval": 1,
        "logging.tensorboard_dir": None, "logging.progress_bar": False,
        "eval.at_start": False, "eval.at_end": False,
        **{f"stage_config.{key}": value for key, value in tiny.stage_config.items()}, **values})


def check_job(text: str, ckpt: Path, config: str) -> dict:
    """Two tasks, steps 1..STEPS with their losses, the last step saved by a run at the layout of
    the YAML ``config``. Returns the saved run config."""
    check_uninterrupted(text, STEPS)
    assert (ckpt / "latest").read_text().strip().endswith(f"iter_{STEPS:07d}"), text[-3000:]
    return check_saved_layout(ckpt, config)


@pytest.fixture(scope="module")
def stage1(slurm, assets, tmp_path_factory):
    """slurm/stage1_mim.sbatch: (its log, its checkpoint.dir)."""
    root = tmp_path_factory.mktemp("stage1_mim") / "job"
    ckpt = root / "ckpt"
    return run_sbatch(slurm, "stage1_mim.sbatch", root, tiny_overrides("mim", assets, ckpt)), ckpt


def test_stage1_sbatch_trains(stage1):
    text, ckpt = stage1
    run = check_job(text, ckpt, "examples/stage1_mim.yaml")
    assert (run["stage"], run["stage_config"]["mask_ratio"]) == ("mim", 0.75)
    assert "masked_tokens" in text, text[-3000:]  # the MIM stage's metrics


def test_stage2_sbatch_trains_from_stage1(slurm, assets, stage1, tmp_path):
    ckpt = tmp_path / "job" / "ckpt"
    # the YAML's text tower: the tiny one, random (no converted SigLIP2 weights)
    text = run_sbatch(slurm, "stage2_contrastive.sbatch", tmp_path / "job",
                      tiny_overrides("contrastive", assets, ckpt,
                                     **{"checkpoint.load_dir": str(stage1[1]),
                                        "stage_config.text": "tiny_text",
                                        "stage_config.text_init_dir": None,
                                        "stage_config.eval_data_dir": None}))
    run = check_job(text, ckpt, "examples/stage2_contrastive.yaml")
    assert (run["stage"], run["stage_config"]["loss_scope"]) == ("contrastive", "step")
    assert re.search(rf"initialised weights from {re.escape(str(stage1[1]))}/iter_{STEPS:07d}",
                     text), text[-3000:]
    assert "logit_scale" in text, text[-3000:]  # the contrastive stage's metrics
