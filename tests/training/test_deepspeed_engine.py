"""The DeepSpeed ZeRO-2 engine against the megatron engine (same seed, data and AdamW: the same
loss trajectory on CPU fp32) on the toy LM and on Stages I (MIM) and II (contrastive, through its
unfreeze, context and resolution switches), exact resume through a DeepSpeed checkpoint,
weights-only initialisation from either engine's checkpoint, and config errors."""

from pathlib import Path

import pytest
import torch

from megatron_finevit.config.train import TrainConfig
from megatron_finevit.testing.multirank import run_world
from megatron_finevit.testing.stage_assets import make_stage_assets, tiny_run

STEPS = 8
# Measured over 8 steps (DP=2, fp32, CPU): losses differ by <= 5.4e-8 relative, gradient norms by
# <= 1.4e-7 relative, final weights by <= 2.5e-7 absolute — fp32 rounding only (megatron DDP and
# ZeRO-2 sum the gradients in a different order). Asserted with margin:
LOSS_RTOL = 1e-6
WEIGHT_ATOL = 5e-6
# Stages I and II: three steps at DP=2 with two micro-batches per rank (gradient accumulation).
STAGES = ("mim", "contrastive")
STAGE_STEPS = 3
STAGE_RTOL = 1e-5
# Stage II switches inside the three steps: the text tower unfreezes at step 1, the text context
# and the resolution grow at step 2 — DeepSpeed must see the same LR-0 group, the same in-place
# position stretch (refreshing ZeRO's fp32 partitions) and the same packs.
CONTRASTIVE_SWITCHES = {"unfreeze_text_at": 1, "context_length": 16, "context_schedule": [[2, 24]]}
MAX_PIXELS_SCHEDULE = [[2, 112 * 112]]


def _cfg(engine, ckpt=None, steps=STEPS, **stage):
    cfg = TrainConfig(stage="toy_lm", engine=engine, train_steps=steps, global_batch_size=4,
                      precision="fp32", stage_config={"num_layers": 2, **stage})
    cfg.parallel.distributed_optimizer = True
    cfg.optim.lr, cfg.optim.warmup_steps, cfg.optim.weight_decay = 3e-3, 2, 0.01
    cfg.optim.clip_grad = 0.5  # small enough that clipping is active in early steps
    cfg.eval.at_start = cfg.eval.at_end = False
    cfg.logging.log_interval = 100
    if ckpt:
        cfg.checkpoint.dir = str(ckpt)
    return cfg


def _weights(module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def _record_steps(trainer) -> list:
    """Wrap ``train_step`` to keep every step's metrics (loss, grad norm, LR)."""
    history, inner = [], trainer.train_step

    def step():
        metrics = inner()
        history.append(dict(metrics) if metrics is not None else None)
        return metrics

    trainer.train_step = step
    return history


def engines_world(rank, world_size, tmp, assets):
    from megatron_finevit.training.trainer import Trainer, _unwrap, build_trainer

    tmp = Path(tmp)
    out = {}
    # Megatron engine: DP=2, distributed optimizer; saves its final weights for (D).
    megatron = Trainer(_cfg("megatron", tmp / "megatron"))
    megatron_init = _weights(_unwrap(megatron.model[0]))
    megatron_steps = _record_steps(megatron)
    megatron.train()
    megatron_final = _weights(_unwrap(megatron.model[0]))
    # DeepSpeed engine, same config.
    ds = build_trainer(_cfg("deepspeed"))
    out["engine_type"] = type(ds).__name__
    ds_init = _weights(ds.engine.module)
    ds_steps = _record_steps(ds)
    ds_run = ds.train()
    ds_final = _weights(ds.engine.module)
    out["names_match"] = sorted(megatron_init) == sorted(ds_init)
    out["init_max_diff"] = max((megatron_init[k] - ds_init[k]).abs().max().item() for k in ds_init)
    out["final_max_diff"] = max((megatron_final[k] - ds_final[k]).abs().max().item()
                                for k in ds_final)
    out["megatron_steps"], out["ds_steps"] = megatron_steps, ds_steps
    out["ds_losses"] = ds_run["losses"]
    # (B) pre-empted by SIGUSR1 (rank 0 only) before step 4, resumed from the DeepSpeed checkpoint
    first = build_trainer(_cfg("deepspeed", tmp / "ds", signal_at_step=4)).train()
    second = build_trainer(_cfg("deepspeed", tmp / "ds")).train()
    out["preempted"] = {"first": first, "second": second,
                        "listing": sorted(p.name for p in (tmp / "ds").iterdir())}
    # (C) a NaN loss skips the step (ZeRO does not update, the schedule does not advance), as
    # in the megatron engine
    skipping = build_trainer(_cfg("deepspeed", steps=3, nan_loss_steps=[1]))
    out["skipped"] = skipping.train()
    out["skipped_by_zero"] = skipping.engine.skipped_steps
    out["skipped_megatron"] = Trainer(_cfg("megatron", steps=3, nan_loss_steps=[1])).train()
    # (D) weights-only initialisation from a megatron-engine and from a DeepSpeed checkpoint
    cfg = _cfg("deepspeed")  # built, not trained
    cfg.checkpoint.load_dir = str(tmp / "megatron")
    from_megatron = _weights(build_trainer(cfg).engine.module)
    cfg.checkpoint.load_dir = str(tmp / "ds")
    from_ds = _weights(build_trainer(cfg).engine.module)
    out["load_dir_megatron_diff"] = max((megatron_final[k] - from_megatron[k]).abs().max().item()
                                        for k in from_megatron)
    out["load_dir_ds_diff"] = max((ds_final[k] - from_ds[k]).abs().max().item() for k in from_ds)
    out["scalar"] = _scalar_parameter_check(rank)
    out["stages"] = {stage: _stage_on_both_engines(stage, assets) for stage in STAGES}
    return out


def _stage_cfg(stage, assets, engine):
    switches = CONTRASTIVE_SWITCHES if stage == "contrastive" else {}
    cfg = tiny_run(stage, assets, steps=STAGE_STEPS, global_batch=4, **switches)
    if stage == "contrastive":
        cfg.stage_config["data"]["max_pixels_schedule"] = MAX_PIXELS_SCHEDULE
    cfg.engine = engine
    cfg.parallel.distributed_optimizer = True
    cfg.optim.warmup_steps = 1  # the LR changes every step
    return cfg


def _stage_on_both_engines(stage, assets) -> dict:
    """Three steps of ``stage`` through each engine from the same seed: per-step metrics and
    the initial and final weights."""
    from megatron_finevit.training.trainer import _unwrap, build_trainer

    runs = {}
    for engine in ("megatron", "deepspeed"):
        trainer = build_trainer(_stage_cfg(stage, assets, engine))
        module = trainer.engine.module if engine == "deepspeed" else _unwrap(trainer.model[0])
        init = _weights(module)
        steps = [trainer.train_step() for _ in range(STAGE_STEPS)]
        runs[engine] = {"init": init, "steps": steps, "final": _weights(module)}
    return runs


class _ScaledLinear(torch.nn.Module):
    def __init__(self, scale: float):
        super().__init__()
        self.linear = torch.nn.Linear(4, 4)
        self.scale = torch.nn.Parameter(torch.tensor(scale))  # 0-dim, like SigLIP's t and b


def _scalar_parameter_check(rank) -> dict:
    """A 0-dim parameter goes through DeepSpeed's start-up broadcast (rank 0's value wins) and a
    ZeRO-2 step with its shape intact."""
    from megatron_finevit.training.deepspeed_engine import deepspeed_config, initialize_zero2

    torch.manual_seed(0)
    module = _ScaledLinear(scale=float(rank + 1))
    cfg = _cfg("deepspeed")
    cfg.global_batch_size = 2  # one micro-batch per rank
    config = deepspeed_config(cfg, microbatches_per_rank=1, bf16=False)
    engine = initialize_zero2(module, [{"params": list(module.parameters())}], config)
    after_broadcast = module.scale.item()
    loss = (module.scale * module.linear(torch.ones(2, 4))).square().mean()
    engine.backward(loss)
    engine.step()
    return {"shape": tuple(module.scale.shape), "after_broadcast": after_broadcast,
            "after_step": module.scale.item(), "applied": engine.was_step_applied()}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("ds")
    assets = make_stage_assets(root / "assets")
    return run_world(engines_world, 2, args=(str(root), assets), timeout_s=600)


def test_dispatch_and_identical_start(world):
    assert world[0]["engine_type"] == "DeepSpeedTrainer"
    assert world[0]["names_match"]
    assert world[0]["init_max_diff"] == 0.0  # same seed, same build path: bit-identical


def test_loss_trajectory_matches_megatron_engine(world):
    m, d = world[1]["megatron_steps"], world[1]["ds_steps"]  # the logging rank
    assert len(m) == len(d) == STEPS and None not in m + d
    for step, (a, b) in enumerate(zip(m, d)):
        assert b["lr"] == a["lr"], (step, a, b)  # same schedule, step for step
        assert abs(b["loss"] - a["loss"]) <= LOSS_RTOL * abs(a["loss"]), (step, a, b)
        assert abs(b["grad_norm"] - a["grad_norm"]) <= LOSS_RTOL * a["grad_norm"], (step, a, b)
    assert d[-1]["loss"] < d[0]["loss"] - 0.5  # and it learns
    assert world[0]["final_max_diff"] <= WEIGHT_ATOL


@pytest.mark.parametrize("stage", STAGES)
def test_stage_matches_megatron_engine(world, stage):
    """Stages I and II through ``engine: deepspeed`` give the megatron engine's losses, gradient
    norms, LRs and final weights (DP=2, fp32, three steps)."""
    for rank in (0, 1):
        runs = world[rank]["stages"][stage]
        m, d = runs["megatron"], runs["deepspeed"]
        assert sorted(m["init"]) == sorted(d["init"])
        assert all(torch.equal(m["init"][k], d["init"][k]) for k in m["init"])  # same start
        assert len(m["steps"]) == len(d["steps"]) == STAGE_STEPS and None not in m["steps"]
        for step, (a, b) in enumerate(zip(m["steps"], d["steps"])):
            assert b["lr"] == a["lr"], (step, a, b)
            for key in ("loss", "grad_norm"):
                assert b[key] == pytest.approx(a[key], rel=STAGE_RTOL), (step, key, a, b)
        assert len({s["loss"] for s in d["steps"]}) == STAGE_STEPS  # the weights move
        # Weights against the model's scale, not tensor by tensor: the attention key bias has
        # an exactly-zero gradient (softmax ignores a per-query constant), so Adam steps it on
        # rounding noise, differently in each engine (measured 6.2e-7 there, <= 6e-8 elsewhere).
        diff = max((d["final"][k] - w).abs().max().item() for k, w in m["final"].items())
        scale = max(w.abs().max().item() for w in m["final"].values())
        assert diff <= STAGE_RTOL * scale, (diff, scale)


def test_preempted_run_resumes_exactly(world):
    for rank in (0, 1):
        b = world[rank]["preempted"]
        assert b["first"]["stopped_by_signal"] and b["first"]["state"]["step"] == 5
        assert b["second"]["state"]["step"] == STEPS
    b = world[1]["preempted"]
    assert b["first"]["losses"] + b["second"]["losses"] == world[1]["ds_losses"]  # bit-exact
    listing = world[0]["preempted"]["listing"]
    assert "latest" in listing and "iter_0000008" in listing
    assert not [name for name in listing if name.endswith(".tmp")]


def test_nonfinite_loss_is_skipped(world):
    s, m = world[1]["skipped"], world[1]["skipped_megatron"]
    assert s["state"] == m["state"] and s["state"]["skipped_steps"] == 1
    assert world[1]["skipped_by_zero"] == 1  # DeepSpeed itself saw the non-finite gradients
    assert len(s["losses"]) == len(m["losses"]) == 2
    for a, b in zip(m["losses"], s["losses"]):
        assert abs(b - a) <= LOSS_RTOL * abs(a)


def test_weights_only_init_from_either_engine(world):
    for rank in (0, 1):
        assert world[rank]["load_dir_megatron_diff"] == 0.0
        assert world[rank]["load_dir_ds_diff"] == 0.0


def test_scalar_parameters_survive_deepspeed_start_up(world):
    s0, s1 = world[0]["scalar"], world[1]["scalar"]
    assert s0["shape"] == s1["shape"] == ()
    assert s0["after_broadcast"] == s1["after_broadcast"] == 1.0  # rank 0's value
    assert s0["applied"] and s0["after_step"] == s1["after_step"] != 1.0


def test_deepspeed_with_model_parallelism_fails_before_compute():
    from megatron_finevit.training.trainer import build_trainer

    cfg = _cfg("deepspeed")
    cfg.parallel.tensor_parallel = 2
    with pytest.raises(ValueError, match="engine 'deepspeed' is data parallel only"):
        build_trainer(cfg)
