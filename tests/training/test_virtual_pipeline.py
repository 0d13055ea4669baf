"""Virtual pipeline stages (interleaved 1F1B) for the FineViT-VL LM, and the TE-only switches.

* PP2 x VP2 on two ranks (a 4-layer tiny Qwen3: one layer per chunk, the encoder and projector
  in rank 0's first chunk): from the same initial weights, three Stage III steps through the
  trainer give the single-rank losses and, in the saved checkpoints, the single-rank weights; a
  run stopped after two steps and resumed gives the third; each of the two final checkpoints,
  loaded at one rank, gives the same next loss (the VP checkpoint's layers keep global numbers).
* Refusals, as config errors: VP without PP, for a stage that builds no chunks, LM layers that
  do not split into the chunks, micro-batches per step not a multiple of DP x PP, held-out
  generation under VP.
* ``gradient_accumulation_fusion`` / ``tp_comm_overlap``: refused with the local spec, passed
  into every tower's TransformerConfig with the te spec (the configs only: neither runs here).
"""

from __future__ import annotations

import shutil

import pytest
import torch

from megatron_finevit.config.errors import ConfigError
from megatron_finevit.testing.multirank import run_world
from megatron_finevit.testing.stage_assets import make_align_assets, tiny_align_run

STEPS = 3
LLM = {"num_layers": 4}
FAKE_ASSETS = {"train": "/nonexistent/train"}


def _config(assets, steps, pp=1, vp=1, load_dir=None, ckpt_dir=None, **stage_config):
    cfg = tiny_align_run(assets, steps, pp=pp, llm_overrides=dict(LLM), **stage_config)
    cfg.parallel.virtual_pipeline_parallel = vp
    cfg.checkpoint.load_dir, cfg.checkpoint.dir = load_dir, ckpt_dir
    return cfg


def single_rank_world(rank, world_size, assets, dirs):
    from megatron_finevit.training.trainer import Trainer

    init = _config(assets, 0, ckpt_dir=dirs["init"])
    init.parallel.distributed_optimizer = False  # its state cannot be saved before a step
    Trainer(init).train()
    return Trainer(_config(assets, STEPS, load_dir=dirs["init"],
                           ckpt_dir=dirs["single"])).train()["losses"]


def vp_world(rank, world_size, assets, dirs):
    from megatron_finevit.training.trainer import Trainer, _unwrap

    out = {}
    trainer = Trainer(_config(assets, STEPS, pp=2, vp=2, load_dir=dirs["init"],
                              ckpt_dir=dirs["vp"]))
    modules = [_unwrap(chunk) for chunk in trainer.model]
    out["chunks"] = [(m.pre_process, m.post_process, hasattr(m, "encoder"),
                      len(m.llm.decoder.layers)) for m in modules]
    out["losses"] = trainer.train()["losses"]
    # the same run saved after two steps, resumed for the third
    first = Trainer(_config(assets, STEPS, pp=2, vp=2, load_dir=dirs["init"],
                            ckpt_dir=dirs["resume"]))
    losses = [(first.train_step() or {}).get("loss") for _ in range(STEPS - 1)]
    first.save()
    rest = Trainer(_config(assets, STEPS, pp=2, vp=2, ckpt_dir=dirs["resume"])).train()
    out["resumed"] = losses + rest["losses"]
    return out


def reload_world(rank, world_size, assets, dirs):
    """One step at one rank from each run's final weights (weights only: same data order)."""
    from megatron_finevit.training.trainer import Trainer

    return {name: Trainer(_config(assets, 1, load_dir=dirs[name])).train()["losses"]
            for name in ("single", "vp")}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("vp")
    assets = make_align_assets(root / "assets")
    dirs = {name: str(root / name) for name in ("init", "single", "vp", "resume")}
    (single,) = run_world(single_rank_world, 1, args=(assets, dirs), timeout_s=900)
    pair = run_world(vp_world, 2, args=(assets, dirs), timeout_s=900)
    (reloaded,) = run_world(reload_world, 1, args=(assets, dirs), timeout_s=900)
    return {"single": single, "pair": pair, "reloaded": reloaded, "dirs": dirs}


def _rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


def test_chunks_hold_the_model_as_megatron_interleaves_it(runs):
    # (pre_process, post_process, encoder, LM layers) of each rank's two chunks
    assert runs["pair"][0]["chunks"] == [(True, False, True, 1), (False, False, False, 1)]
    assert runs["pair"][1]["chunks"] == [(False, False, False, 1), (False, True, False, 1)]


def test_pp2_vp2_losses_equal_single_rank(runs):
    single, losses = runs["single"], runs["pair"][1]["losses"]
    assert len(single) == len(losses) == STEPS
    assert max(_rel(a, b) for a, b in zip(losses, single)) <= 1e-5, (losses, single)


def test_pp2_vp2_weights_equal_single_rank(runs):
    from megatron_finevit.convert.mcore_io import MegatronCheckpointReader
    from megatron_finevit.training.checkpointing import latest_checkpoint

    single = MegatronCheckpointReader(latest_checkpoint(runs["dirs"]["single"]))
    vp = MegatronCheckpointReader(latest_checkpoint(runs["dirs"]["vp"]))
    keys = [k for k in single.keys() if k.startswith(("llm.", "encoder.", "projector."))]
    assert keys and set(keys) == {k for k in vp.keys()
                                  if k.startswith(("llm.", "encoder.", "projector."))}
    assert any(k.startswith("llm.decoder.layers.") for k in keys)
    a = single.load([(k, None) for k in keys])
    b = vp.load([(k, None) for k in keys])
    worst = max(float((b[(k, None)] - a[(k, None)]).norm() / a[(k, None)].norm().clamp(min=1e-12))
                for k in keys)
    assert worst <= 1e-5, worst


def test_pp2_vp2_resume_equals_uninterrupted(runs):
    assert runs["pair"][1]["resumed"] == runs["pair"][1]["losses"]


def test_vp_checkpoint_loads_at_one_rank(runs):
    reloaded = runs["reloaded"]
    assert _rel(reloaded["vp"][0], reloaded["single"][0]) <= 1e-5, reloaded


# --- refusals ------------------------------------------------------------------------------------


def _problems(cfg, world_size=2):
    from megatron_finevit.training.preflight import find_problems

    return find_problems(cfg, world_size).problems


def test_virtual_pipeline_needs_pipeline_parallel():
    cfg = _config(FAKE_ASSETS, 1, vp=2)
    with pytest.raises(ConfigError, match="virtual_pipeline_parallel=2 needs pipeline_parallel"):
        cfg.validate()
    cfg.parallel.virtual_pipeline_parallel = 0
    with pytest.raises(ConfigError, match="virtual_pipeline_parallel=0 must be an integer >= 1"):
        cfg.validate()


def test_virtual_pipeline_refused_for_a_stage_without_chunks():
    from megatron_finevit.testing.stage_assets import tiny_run

    cfg = tiny_run("mim", {"train": "/nonexistent", "teacher": "/nonexistent"}, 1, pp=2)
    cfg.parallel.virtual_pipeline_parallel = 2
    assert any("stage 'mim' does not build model chunks" in p for p in _problems(cfg))


@pytest.mark.parametrize("layers, first, message", [
    (2, None, "2 layers do not split into pipeline_parallel x virtual_pipeline = 2 x 2"),
    (6, 1, "first_stage_llm_layers=1 and the other stages' 5 layers each must be multiples"),
    (6, 2, "first_stage_llm_layers=2 and the other stages' 4 layers each must be multiples"
           " of virtual_pipeline=4"),
])
def test_llm_layers_must_split_into_the_chunks(layers, first, message):
    from megatron_finevit.training.stage import get_stage

    vp = 4 if first == 2 else 2
    cfg = _config(FAKE_ASSETS, 1, pp=2, vp=vp, first_stage_llm_layers=first)
    cfg.stage_config["llm_overrides"]["num_layers"] = layers
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        get_stage("align")(cfg)


def test_micro_batches_must_be_a_multiple_of_dp_times_pp():
    cfg = _config(FAKE_ASSETS, 1, pp=2, vp=2)
    cfg.global_batch_size = 3
    assert any("global_batch_size=3: virtual_pipeline_parallel needs the micro-batches per step "
               "to be a multiple of data_parallel x pipeline_parallel = 1 x 2" in p
               for p in _problems(cfg))
    cfg.global_batch_size = 4
    assert not any("virtual_pipeline" in p for p in _problems(cfg))


def test_held_out_generation_refused_under_virtual_pipeline():
    from megatron_finevit.training.stage import get_stage

    cfg = _config(FAKE_ASSETS, 1, pp=2, vp=2, eval_data_dir="/nonexistent/eval")
    with pytest.raises(ConfigError, match="eval_data_dir: held-out generation runs without "
                                          "virtual pipeline"):
        get_stage("align")(cfg)


# --- TE-only switches ----------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["gradient_accumulation_fusion", "tp_comm_overlap"])
def test_te_only_switches_refused_with_the_local_spec(key):
    cfg = _config(FAKE_ASSETS, 1, tp=2, sp=True,
                  vit_overrides={"num_layers": 2, "spec_backend": "te"})
    setattr(cfg.parallel, key, True)
    with pytest.raises(ConfigError, match=f"parallel.{key} needs spec_backend te .* llm use"):
        cfg.validate()


def test_te_only_switches_pass_into_every_tower_with_the_te_spec(monkeypatch):
    import megatron_finevit.config.common as common
    import megatron_finevit.config.llm as llm
    import megatron_finevit.config.vit as vit
    from megatron_finevit.training.stage import get_stage

    # no TransformerEngine here: build the TransformerConfigs only (no te layer is built)
    for module in (common, llm, vit):
        monkeypatch.setattr(module, "require_spec_backend", lambda config: None)
    te = {"spec_backend": "te"}
    cfg = _config(FAKE_ASSETS, 1, tp=2, sp=True, vit_overrides={"num_layers": 2, **te})
    cfg.stage_config["llm_overrides"].update(te)
    p = cfg.parallel
    p.gradient_accumulation_fusion = p.tp_comm_overlap = True
    assert cfg.problems() == []
    assert p.transformer_overrides() == {"gradient_accumulation_fusion": True,
                                         "tp_comm_overlap": True}
    for config in get_stage("align")(cfg).transformer_configs():
        assert config.gradient_accumulation_fusion and config.tp_comm_overlap
    p.tp_comm_overlap = False
    encoder, language_model = get_stage("align")(cfg).transformer_configs()
    assert encoder.gradient_accumulation_fusion and not language_model.tp_comm_overlap
