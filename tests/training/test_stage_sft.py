"""The ``sft`` stage through the trainer, on conversations of every kind (one image, two images,
text only, a ``<think>`` answer, multi-turn).

* Start: from a Stage III trainer checkpoint (``checkpoint.load_dir``) every weight of the
  FineViT-VL equals that checkpoint's, tensor by tensor.
* Layouts: three steps at DP2 (distributed optimiser), TP2 + SP, PP2 and CP2 give the single-rank
  losses (DP2 against one rank accumulating both ranks' packs; CP2 against one rank on the same
  packs, every conversation padded to 2·cp tokens); packs of text-only samples have no ViT side on
  any layout.
* Resume: stopped after 2 of 4 steps and resumed gives the uninterrupted losses bit for bit.
* megatron's ``overlap_grad_reduce`` (the paper YAMLs') with steps whose micro-batch gives the
  encoder no gradient — a text-only pack, a frozen encoder — gives the losses without it.
* Per-kind losses are logged; config errors (no weight source, an unknown phase) are listed.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from megatron_finevit.testing.multirank import run_world
from megatron_finevit.testing.stage_assets import (Interleaved, make_align_assets, tiny_align_run,
                                                   tiny_sft_run)

STEPS = 3
RESUME_STEPS, STOP = 4, 2
LAYOUTS = {"dp2": dict(), "tp2_sp": dict(tp=2, sp=True),
           "pp2": dict(pp=2, first_stage_llm_layers=1), "cp2": dict(cp=2)}
ORACLES = {"dp2": "dp_oracle", "cp2": "cp_oracle"}


def _config(assets, steps, load_dir, layout=None, **stage_config):
    layout = dict(layout or {})
    first = layout.pop("first_stage_llm_layers", None)
    if first is not None:
        stage_config["first_stage_llm_layers"] = first
    cp = layout.pop("cp", 1)
    cfg = tiny_sft_run(assets, steps, **layout, **stage_config)
    cfg.parallel.context_parallel = cp
    cfg.checkpoint.load_dir = load_dir
    return cfg


def _metrics(trainer, steps):
    return [trainer.train_step() or {} for _ in range(steps)]


def single_rank_world(rank, world_size, assets, dirs):
    from megatron_finevit.convert.mcore_io import MegatronCheckpointReader
    from megatron_finevit.data.tasks.conversation_loader import ConversationLoader
    from megatron_finevit.training.checkpointing import latest_checkpoint
    from megatron_finevit.training.trainer import Trainer

    out = {}
    stage3 = tiny_align_run(assets, 1)  # one step: weights no initialiser would give
    stage3.checkpoint.dir = dirs["stage3"]
    stage3.parallel.distributed_optimizer = False
    Trainer(stage3).train()
    start = _config(assets, 0, dirs["stage3"])
    start.checkpoint.dir = dirs["sft_start"]
    start.parallel.distributed_optimizer = False
    Trainer(start).train()
    a = MegatronCheckpointReader(latest_checkpoint(dirs["stage3"]))
    b = MegatronCheckpointReader(latest_checkpoint(dirs["sft_start"]))
    model_keys = sorted(k for k in a.keys() if k.split(".")[0] in ("encoder", "projector", "llm"))
    out["start_keys"] = (len(model_keys), set(model_keys) <= set(b.keys()))
    out["start_equal"] = all(torch.equal(a.load([(k, None)])[(k, None)],
                                         b.load([(k, None)])[(k, None)]) for k in model_keys)

    trainer = Trainer(_config(assets, STEPS, dirs["stage3"]))
    metrics = _metrics(trainer, STEPS)
    out["single"] = [m.get("loss") for m in metrics]
    out["metric_keys"] = sorted(set().union(*metrics))
    trainer = Trainer(_config(assets, STEPS, dirs["stage3"], global_batch=2))
    trainer.data = Interleaved([trainer.stage._loader(assets["sft"], r, 2) for r in range(2)])
    out["dp_oracle"] = [m.get("loss") for m in _metrics(trainer, STEPS)]
    trainer = Trainer(_config(assets, STEPS, dirs["stage3"]))
    stage = trainer.stage
    trainer.data = ConversationLoader(assets["sft"], dataclasses.replace(
        stage.data_config, segment_multiple=4), stage.template.tokenizer, use_draft=True,
        norm=stage.norm)  # CP2's packs: every conversation padded to 2·cp = 4 tokens
    out["cp_oracle"] = [m.get("loss") for m in _metrics(trainer, STEPS)]
    out["pack_kinds"] = _pack_kinds(trainer.stage._loader(assets["sft"], 0, 1))
    loader = trainer.stage._loader(assets["sft"], 0, 1)  # what the DP1 layouts' steps read
    out["text_only_pack_in_steps"] = any(next(loader).images is None for _ in range(2 * STEPS))
    dp_loaders = [trainer.stage._loader(assets["sft"], r, 2) for r in range(2)]
    out["text_only_pack_at_dp2"] = any(next(dp_loaders[r]).images is None
                                       for _ in range(STEPS) for r in range(2))
    return out


def _pack_kinds(loader):
    """Whether some pack of an epoch has no image at all, and the sample kinds seen."""
    text_only, kinds = False, set()
    for batch in loader.epoch():
        text_only |= batch.images is None
        kinds |= {batch.kinds[t] for t in batch.label_task[batch.label_task >= 0].tolist()}
    return text_only, kinds


def layouts_world(rank, world_size, assets, dirs):
    from megatron_finevit.training.trainer import Trainer

    out = {}
    for name, layout in LAYOUTS.items():
        out[name] = [m.get("loss") for m in
                     _metrics(Trainer(_config(assets, STEPS, dirs["stage3"], layout)), STEPS)]
    for name, overlap, vit_policy in (("frozen", False, {"train_from": None}),
                                      ("frozen_overlap", True, {"train_from": None}),
                                      ("overlap", True, {"train_from": 0})):
        cfg = _config(assets, STEPS, dirs["stage3"], vit_policy=vit_policy)
        cfg.parallel.overlap_grad_reduce = overlap
        out[name] = [m.get("loss") for m in _metrics(Trainer(cfg), STEPS)]
    out["uninterrupted"] = Trainer(_config(assets, RESUME_STEPS, dirs["stage3"])).train()["losses"]
    cfg = _config(assets, RESUME_STEPS, dirs["stage3"])
    cfg.checkpoint.dir = dirs["resume"]
    first = Trainer(cfg)
    head = [m["loss"] for m in _metrics(first, STOP)]
    first.save()
    out["resumed"] = head + Trainer(cfg).train()["losses"]
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from megatron_finevit.testing.conversations import make_conversation_shards

    root = tmp_path_factory.mktemp("stage_sft")
    assets = make_align_assets(root / "assets", num_train=16, num_eval=4)
    # 60 conversations of every kind and 40 more text-only ones, so some packs hold no image
    assets["sft"] = make_conversation_shards(root / "sft", 60, seed=0, text_only=40)
    dirs = {k: str(root / k) for k in ("stage3", "sft_start", "resume")}
    (single,) = run_world(single_rank_world, 1, args=(assets, dirs), timeout_s=900)
    pair = run_world(layouts_world, 2, args=(assets, dirs), timeout_s=1200)
    return single, pair


def test_sft_starts_from_the_whole_stage3_model(runs):
    single, _ = runs
    count, present = single["start_keys"]
    assert count > 20 and present
    assert single["start_equal"]


def test_per_kind_losses_and_text_only_packs(runs):
    single, _ = runs
    assert all(torch.isfinite(torch.tensor(loss)) for loss in single["single"])
    assert {"loss_image", "loss_text"} <= set(single["metric_keys"])
    text_only, kinds = single["pack_kinds"]
    assert kinds == {"text", "image", "multi_image", "reasoning"}
    assert text_only, "the set should give a pack without images"
    assert single["text_only_pack_in_steps"]  # so TP2 + SP and PP2 below meet one


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_losses_equal_single_rank(runs, name):
    single, pair = runs
    oracle = single[ORACLES.get(name, "single")]
    assert len(set(oracle)) == STEPS
    holders = [r[name] for r in pair if r[name][0] is not None]
    assert len(holders) == (1 if name == "pp2" else 2)  # under PP only the last stage reports
    for losses in holders:
        assert losses == pytest.approx(oracle, rel=1e-5)


def test_resume_is_exact(runs):
    _, pair = runs
    for rank_result in pair:
        assert rank_result["resumed"] == rank_result["uninterrupted"]


def test_config_problems_are_listed_together(tmp_path):
    from megatron_finevit.config.errors import ConfigError
    from megatron_finevit.training.stages.sft import SFTStage

    cfg = tiny_sft_run({"train": str(tmp_path), "sft": str(tmp_path)}, 1, phase=3)
    with pytest.raises(ConfigError) as info:
        SFTStage(cfg)
    message = str(info.value)
    assert "phase=3 must be 1 or 2" in message
    assert "SFT starts from trained weights" in message
    ok = tiny_sft_run({"train": str(tmp_path), "sft": str(tmp_path)}, 1, phase=2,
                      allow_random_init=True)
    ok.stage_config["data"].pop("llm_tokens")
    assert SFTStage(ok).cfg.data.llm_tokens == 10240  # the phase's default (paper B.1)


def test_overlapped_grad_reduce_with_steps_that_skip_the_encoder(runs):
    """A text-only pack is some rank's only micro-batch in these steps (checked), and a frozen
    encoder runs under no_grad: with overlap_grad_reduce megatron would wait for their gradients;
    the model gives them zeros, so the losses equal those without the overlap."""
    single, pair = runs
    assert single["text_only_pack_at_dp2"]
    for rank_result in pair:
        assert rank_result["overlap"] == pytest.approx(rank_result["dp2"], rel=1e-6)
        assert rank_result["frozen_overlap"] == pytest.approx(rank_result["frozen"], rel=1e-6)
        assert rank_result["frozen"] != rank_result["dp2"]  # the policy took effect
