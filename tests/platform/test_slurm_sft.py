"""The SFT sbatch files themselves on the local Slurm cluster (``testing.local_slurm``):
``slurm/sft_phase1.sbatch``, ``slurm/sft_phase2.sbatch`` with its two recipes (CONFIG unset:
``examples/sft_phase2.yaml``; CONFIG=examples/sft_phase2_8b.yaml, CP) and
``slurm/sft_ablation.sbatch`` with CONFIG=examples/sft_ablation_frozen_vit.yaml.

Each file is submitted as a user submits it (``slurm_jobs.run_sbatch``: one node, two tasks, the
file's YAML made tiny by config overrides — the models and packs of
``testing.stage_assets.tiny_sft_run`` over synthetic conversations, fp32, no evaluation; the
YAML's layout, phase and module policies stay unless two CPU tasks cannot hold them, checked in
the saved checkpoint; the YAMLs' overlap of gradient reduction stays on) and chained
as the recipes chain: a one-step tiny Stage III run -> phase I -> phase II (both recipes); the
ablation starts from the Stage III run too (a whole FineViT-VL, as its projector warm-up would
be). Every job trains ``STEPS`` steps on both tasks, logs each step's loss and the per-kind
losses, and saves its last step.

Skipped where Slurm is not installed or we are not root (as ``test_slurm.py``).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from slurm_jobs import as_overrides, check_saved_layout, check_uninterrupted, run_sbatch

from megatron_finevit.testing.local_slurm import missing
from megatron_finevit.testing.multirank import run_world
from megatron_finevit.testing.stage_assets import make_align_assets, tiny_align_run, tiny_sft_run

STEPS = 4

pytestmark = pytest.mark.skipif(missing() is not None, reason=str(missing()))


def _train_stage3(rank, world_size, assets, ckpt_dir):
    from megatron_finevit.training.trainer import Trainer

    cfg = tiny_align_run(assets, 1)  # one step: weights no initialiser would give
    cfg.checkpoint.dir = ckpt_dir
    Trainer(cfg).train()


@pytest.fixture(scope="module")
def sft_assets(tmp_path_factory):
    """Align assets, conversation shards (``sft``) and a one-step tiny Stage III run
    (``stage3``, the phase I job's checkpoint.load_dir)."""
    from megatron_finevit.testing.conversations import make_conversation_shards

    root = tmp_path_factory.mktemp("slurm_sft")
    assets = make_align_assets(root / "assets", num_train=16, num_eval=4)
    assets["sft"] = make_conversation_shards(root / "sft", 40, seed=0, text_only=10)
    assets["stage3"] = str(root / "stage3")
    run_world(_train_stage3, 1, args=(assets, assets["stage3"]), timeout_s=600)
    return assets


def sft_overrides(assets: dict, ckpt: Path, load_dir: str, **values) -> list[str]:
    """Config overrides turning an SFT YAML into a tiny fp32 CPU run of ``STEPS`` steps from
    ``load_dir``: the models and packs of ``tiny_sft_run`` (each ``stage_config`` entry replaces
    the YAML's whole value, so the ``te`` specs go), the bundled Qwen tokenizer, no held-out
    evaluation; the YAML's overlap of gradient reduction and parameter gather stays (a frozen
    encoder or a text-only pack last in a step must not stall it); ``values`` on top (a layout
    two tasks can hold)."""
    tiny = tiny_sft_run(assets, STEPS)
    stage = {**tiny.stage_config, "tokenizer_dir": None, "eval_data_dir": None}
    return as_overrides({
        "train_steps": STEPS, "global_batch_size": tiny.global_batch_size,
        "precision": tiny.precision, "optim.lr": 1e-3, "optim.warmup_steps": 0,
        "checkpoint.dir": str(ckpt), "checkpoint.load_dir": load_dir,
        "logging.log_interval": 1, "logging.tensorboard_dir": None,
        "logging.progress_bar": False, "eval.at_start": False, "eval.at_end": False,
        **{f"stage_config.{key}": value for key, value in stage.items()}, **values})


def check_sft_job(text: str, ckpt: Path, config: str, phase: int, **parallel) -> dict:
    """Two tasks, steps 1..STEPS with their losses, the per-kind losses of the SFT stage (image
    and text-only conversations are in every run's data), the last step saved by a run of this
    ``phase`` at the YAML ``config``'s layout with ``parallel`` overridden (DP: the rest of the
    two tasks). Returns the saved run config."""
    check_uninterrupted(text, STEPS)
    assert "loss_image" in text and "loss_text" in text, text[-3000:]
    assert (ckpt / "latest").read_text().strip().endswith(f"iter_{STEPS:07d}"), text[-3000:]
    run = check_saved_layout(ckpt, config, **parallel)
    assert (run["stage"], run["stage_config"]["phase"]) == ("sft", phase)
    return run


@pytest.fixture(scope="module")
def phase1(slurm, sft_assets, tmp_path_factory):
    """slurm/sft_phase1.sbatch from the Stage III run: (its log, its checkpoint.dir)."""
    root = tmp_path_factory.mktemp("sft_phase1") / "job"
    ckpt = root / "ckpt"
    text = run_sbatch(slurm, "sft_phase1.sbatch", root,
                      sft_overrides(sft_assets, ckpt, sft_assets["stage3"]))
    return text, ckpt


def _model_tensors(run_dir: str | Path) -> dict[str, torch.Tensor]:
    """The FineViT-VL tensors (encoder, projector, LLM) of the run's latest checkpoint."""
    from megatron_finevit.convert.mcore_io import MegatronCheckpointReader
    from megatron_finevit.training.checkpointing import latest_checkpoint

    reader = MegatronCheckpointReader(latest_checkpoint(str(run_dir)))
    keys = [(k, None) for k in reader.keys() if k.split(".")[0] in ("encoder", "projector", "llm")]
    return {key: value for (key, _), value in reader.load(keys).items()}


def test_sft_phase1_sbatch_trains_from_stage3(phase1, sft_assets):
    text, ckpt = phase1
    check_sft_job(text, ckpt, "examples/sft_phase1.yaml", phase=1)
    # every weight came from the Stage III run (checkpoint.load_dir), on both tasks
    start = re.escape(f"initialised weights from {sft_assets['stage3']}/iter_0000001; "
                      "0 tensors kept their fresh initialisation")
    assert len(re.findall(start, text)) == 2, text[-3000:]


# Phase II on two tasks (sbatch environment, YAML, layout overrides): the default recipe keeps
# its YAML's layout; the 8B recipe's TP4 x CP2 becomes TP1 x CP2 (its sequence parallelism needs
# TP > 1).
PHASE2 = {"default": ({}, "examples/sft_phase2.yaml", {}),
          "8b_cp2": ({"CONFIG": "examples/sft_phase2_8b.yaml"}, "examples/sft_phase2_8b.yaml",
                     {"tensor_parallel": 1, "context_parallel": 2, "sequence_parallel": False})}


@pytest.mark.parametrize("recipe", list(PHASE2))
def test_sft_phase2_sbatch_trains_from_phase1(slurm, sft_assets, phase1, tmp_path, recipe):
    env, config, parallel = PHASE2[recipe]
    ckpt = tmp_path / "job" / "ckpt"
    overrides = {f"parallel.{key}": value for key, value in parallel.items()}
    text = run_sbatch(slurm, "sft_phase2.sbatch", tmp_path / "job",
                      sft_overrides(sft_assets, ckpt, str(phase1[1]), **overrides), **env)
    check_sft_job(text, ckpt, config, phase=2, **parallel)
    assert re.search(rf"initialised weights from {re.escape(str(phase1[1]))}/iter_{STEPS:07d}; "
                     "0 tensors kept", text), text[-3000:]


ABLATION = "examples/sft_ablation_frozen_vit.yaml"


def test_sft_ablation_sbatch_frozen_vit(slurm, sft_assets, tmp_path):
    ckpt = tmp_path / "job" / "ckpt"
    text = run_sbatch(slurm, "sft_ablation.sbatch", tmp_path / "job",
                      sft_overrides(sft_assets, ckpt, sft_assets["stage3"]), CONFIG=ABLATION)
    run = check_sft_job(text, ckpt, ABLATION, phase=1)
    assert run["stage_config"]["vit_policy"]["train_from"] is None
    # the recipe's point: the encoder is frozen (vit_policy train_from null), the rest trains
    before, after = _model_tensors(sft_assets["stage3"]), _model_tensors(ckpt)
    assert before.keys() == after.keys()
    changed = {k.split(".")[0] for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"projector", "llm"}, changed
