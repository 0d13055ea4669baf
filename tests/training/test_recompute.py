"""Activation recompute from the YAML: ``recompute_granularity`` (+ ``recompute_method``,
``recompute_num_layers``) in ``stage_config.vit_overrides`` / ``llm_overrides`` reaches megatron's
``TransformerConfig`` of that tower, through the trainer.

One Stage III trainer step (tiny FineViT-VL, one rank, the same seed and packs) with recompute off,
``full`` (uniform, one layer a chunk) and ``selective`` (megatron's core-attention recompute,
around our packed core attention) in each tower alone: the loss and every weight after the step
equal the run without recompute. That recompute really ran is counted: the tower's first layer
(full) or its core attention (selective) runs forward twice as often as without recompute — once
more in the backward pass — and the other tower's no more often.
"""

from __future__ import annotations

import pytest
import torch

from megatron_finevit.config.llm import tiny_qwen3
from megatron_finevit.config.vit import tiny_vit
from megatron_finevit.testing.multirank import run_world
from megatron_finevit.testing.stage_assets import make_align_assets, tiny_align_run

FULL = {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1}
SELECTIVE = {"recompute_granularity": "selective"}
RUNS = {"off": {}, "vit_full": {"vit": FULL}, "vit_selective": {"vit": SELECTIVE},
        "llm_full": {"llm": FULL}, "llm_selective": {"llm": SELECTIVE}}
TOWERS = ("vit", "llm")


def _one_step(assets: dict, recompute: dict) -> dict:
    """One trainer step with ``recompute[tower]`` added to that tower's overrides: its loss, the
    weights after it, and how often each tower's first layer and core attention ran forward."""
    from megatron_finevit.training.trainer import Trainer, _unwrap

    cfg = tiny_align_run(assets, 1)
    for tower, values in recompute.items():
        key = f"{tower}_overrides"
        cfg.stage_config[key] = {**cfg.stage_config[key], **values}
    trainer = Trainer(cfg)
    model = _unwrap(trainer.model[0])
    calls = {}
    for tower, module in (("vit", model.encoder), ("llm", model.llm)):
        layer = module.decoder.layers[0]
        assert layer.config.recompute_granularity == recompute.get(tower, {}).get(
            "recompute_granularity")
        for part, counted in (("layer", layer), ("core_attention",
                                                 layer.self_attention.core_attention)):
            name = f"{tower}_{part}"
            calls[name] = 0

            def count(*_, name=name):
                calls[name] += 1

            counted.register_forward_pre_hook(count)
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    metrics = trainer.train_step()
    weights = {k: p.detach().clone() for k, p in model.named_parameters()}
    moved = sorted({k.split(".")[0] for k in weights if not torch.equal(weights[k], before[k])})
    return {"loss": metrics["loss"], "weights": weights, "calls": calls, "moved": moved}


def recompute_world(rank, world_size, assets):
    return {name: _one_step(assets, recompute) for name, recompute in RUNS.items()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    assets = make_align_assets(tmp_path_factory.mktemp("recompute"), num_train=16, num_eval=2)
    (results,) = run_world(recompute_world, 1, args=(assets,), timeout_s=900)
    return results


@pytest.mark.parametrize("name", [n for n in RUNS if n != "off"])
def test_recompute_gives_the_same_step(runs, name):
    off, on = runs["off"], runs[name]
    assert abs(on["loss"] - off["loss"]) <= 1e-6, (on["loss"], off["loss"])
    assert on["weights"].keys() == off["weights"].keys()
    worst = max((on["weights"][k] - off["weights"][k]).abs().max().item() for k in off["weights"])
    assert worst <= 1e-6, worst
    # the step trained every module: equal weights are not those of two steps that did nothing
    assert off["moved"] == on["moved"] == ["encoder", "llm", "projector"], on["moved"]


@pytest.mark.parametrize("name", [n for n in RUNS if n != "off"])
def test_recompute_runs_in_its_tower_only(runs, name):
    off, on = runs["off"]["calls"], runs[name]["calls"]
    tower, granularity = name.split("_")
    recomputed = f"{tower}_{'layer' if granularity == 'full' else 'core_attention'}"
    assert off[recomputed] > 0
    expected = {key: count * (2 if key == recomputed or (granularity == "full" and
                                                         key == f"{tower}_core_attention")
                              else 1)
                for key, count in off.items()}
    assert on == expected, (on, off)


def test_recompute_settings_are_checked_with_the_model_config():
    for config in (tiny_vit(), tiny_qwen3()):
        build = type(config)
        fields = {k: v for k, v in config.to_dict().items()}
        assert build(**{**fields, **FULL}).problems() == []
        assert build(**{**fields, **SELECTIVE}).problems() == []
        problems = build(**{**fields, "recompute_granularity": "full"}).problems()
        assert any("recompute_method" in p for p in problems), problems
        assert any("recompute_num_layers" in p for p in problems), problems
        problems = build(**{**fields, **FULL, "recompute_granularity": "selective"}).problems()
        assert any("need recompute_granularity='full'" in p for p in problems), problems
        problems = build(**{**fields, "recompute_granularity": "partial"}).problems()
        assert any("recompute_granularity='partial'" in p for p in problems), problems
