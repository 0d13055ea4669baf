"""Stages I and II through the trainer at every parallel layout, on data with broken samples: from
the same initial weights, three training steps (so two optimizer updates feed back into the
losses) at TP2 + SP, PP2, PP3, CP2 and CP4 give the single-rank run's losses, and the held-out
evaluation after them (Stage I: MIM loss and cosine; Stage II: retrieval and zero-shot) gives the
single-rank numbers. Stage II runs its text tower beside the encoder: whole on every TP rank's
shard, on the last pipeline stage, replicated over the CP ranks.

The data hold JPEGs whose body is cut after a valid header (indexed, failing only at decode): one
in the first micro-batch, every sample of the third pack, and one in the evaluation split. Under
pipeline parallelism only the first stage decodes (and the last, for Stage I's teacher); the
others must follow its choices. Every run budgets images as CP4 pads them (a multiple of 8), so
all layouts draw the same packs; budgeted at real tokens, the first pack (64 tokens) would
overflow at CP4."""

import pytest

from megatron_finevit.testing.multirank import run_world
from megatron_finevit.testing.stage_assets import make_stage_assets, tiny_run

STAGES = ("mim", "contrastive")
# PP2 decodes in two worker processes per rank (data.num_workers): the same packs and skips
LAYOUTS = {"tp2_sp": dict(tp=2, sp=True), "pp2": dict(pp=2, workers=2), "cp2": dict(cp=2),
           "pp3": dict(pp=3), "cp4": dict(cp=4)}
STEPS = 3
NUM_LAYERS = 6  # splits evenly over two and three pipeline stages
TOKEN_MULTIPLE = 8  # CP4's padding unit (2·cp), valid for CP2 and CP1 too
PACK_TOKENS = 64
EVAL_IMAGES = 48


def _world_size(layout: dict) -> int:
    return layout.get("tp", 1) * layout.get("pp", 1) * layout.get("cp", 1)


def _config(stage, assets, steps, workers=0, **layout):
    cfg = tiny_run(stage, assets, steps=steps, eval_data_dir=assets["eval"],
                   vit_overrides={"num_layers": NUM_LAYERS}, **layout)
    cfg.stage_config["data"].update(pack_tokens=PACK_TOKENS, image_token_multiple=TOKEN_MULTIPLE,
                                    num_workers=workers)
    return cfg


def _break_data(assets) -> list[str]:
    """Cut JPEG bodies in the training packs the runs draw first and in the evaluation split;
    returns the broken training keys."""
    from megatron_finevit.data.index import load_index
    from megatron_finevit.testing.corrupt_shards import next_pack_keys, truncate_image_bodies
    from megatron_finevit.training.stage import get_stage

    cfg = _config("mim", assets, STEPS)
    plan = next_pack_keys(get_stage("mim")(cfg).make_loader(assets["train"], 0, 1, False), 3)
    broken = [plan[0][0], *plan[2]]
    truncate_image_bodies(assets["train"], broken)
    truncate_image_bodies(assets["eval"], [str(load_index(assets["eval"]).key[0])])
    return broken


def _run(stage, assets, init_dir, **layout):
    """(losses, evaluation) of three steps from ``init_dir``'s weights; on ranks off the last
    pipeline stage the losses are None and the evaluation empty."""
    from megatron_finevit.training.trainer import Trainer

    cfg = _config(stage, assets, STEPS, **layout)
    cfg.checkpoint.load_dir = init_dir
    trainer = Trainer(cfg)
    losses = [trainer.train_step().get("loss") for _ in range(STEPS)]
    return losses, trainer.evaluate(), trainer.stage.loader.counter.num_skipped


def single_rank_world(rank, world_size, assets, init_dirs):
    from megatron_finevit.training.stage import get_stage
    from megatron_finevit.training.trainer import Trainer

    out = {"broken": _break_data(assets)}
    with pytest.raises(ValueError, match="image_token_multiple=6 must be 0 or a multiple of 4"):
        bad = _config("mim", assets, STEPS, cp=2)
        bad.stage_config["data"]["image_token_multiple"] = 6
        get_stage("mim")(bad)
    with pytest.raises(ValueError, match="num_workers=-1 must be an integer >= 0"):
        get_stage("mim")(_config("mim", assets, STEPS, workers=-1))
    for stage in STAGES:
        init = _config(stage, assets, steps=0)
        init.checkpoint.dir = init_dirs[stage]
        init.parallel.distributed_optimizer = False  # its state cannot be saved before a step
        Trainer(init).train()  # saves the initial weights
        out[stage] = _run(stage, assets, init_dirs[stage])
    return out


def layouts_world(rank, world_size, assets, init_dirs):
    return {(stage, name): _run(stage, assets, init_dirs[stage], **layout)
            for stage in STAGES for name, layout in LAYOUTS.items()
            if _world_size(layout) == world_size}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("stage_layouts")
    assets = make_stage_assets(root / "assets")
    init_dirs = {stage: str(root / f"init_{stage}") for stage in STAGES}
    (single,) = run_world(single_rank_world, 1, args=(assets, init_dirs), timeout_s=600)
    return assets, init_dirs, single


@pytest.fixture(scope="module")
def worlds(setup):
    """Per world size, its ranks' runs (spawned once, on first use)."""
    assets, init_dirs, _ = setup
    cache = {}

    def get(world_size):
        if world_size not in cache:
            cache[world_size] = run_world(layouts_world, world_size, args=(assets, init_dirs),
                                          timeout_s=900)
        return cache[world_size]

    return get


@pytest.mark.parametrize("name", list(LAYOUTS))
@pytest.mark.parametrize("stage", STAGES)
def test_losses_and_evaluation_equal_single_rank(setup, worlds, stage, name):
    single = setup[2]
    losses, evaluation, skipped = single[stage]
    assert len(losses) == STEPS and len(set(losses)) == STEPS  # it trains
    assert skipped == len(single["broken"])  # the broken samples were met and skipped
    key = "mim_cosine" if stage == "mim" else "i2t_r1"
    assert key in evaluation and evaluation["num_images"] == EVAL_IMAGES - 1
    layout = LAYOUTS[name]
    runs = [r[(stage, name)] for r in worlds(_world_size(layout))]
    holders = [r for r in runs if r[0][0] is not None]
    # TP and CP ranks all report; under PP only the last stage does
    assert len(holders) == (1 if "pp" in layout else len(runs))
    for layout_losses, layout_evaluation, _ in holders:
        assert layout_losses == pytest.approx(losses, rel=1e-5)
        assert layout_evaluation.keys() == evaluation.keys()
        for metric, value in evaluation.items():
            assert layout_evaluation[metric] == pytest.approx(value, rel=1e-5, abs=1e-6), metric
