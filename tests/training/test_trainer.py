"""The training loop: exact resume after pre-emption, loading at another parallel layout, atomic
checkpoints, non-finite-loss skipping, config errors."""

from pathlib import Path

import pytest
import torch

from megatron_finevit.config.loader import ConfigError, load_config
from megatron_finevit.config.train import TrainConfig
from megatron_finevit.testing.multirank import run_world


def _cfg(ckpt=None, steps=8, tp=1, **stage):
    cfg = TrainConfig(stage="toy_lm", train_steps=steps, global_batch_size=4,
                      stage_config={"num_layers": 2, **stage})
    cfg.parallel.tensor_parallel = tp
    cfg.parallel.distributed_optimizer = True
    cfg.optim.lr, cfg.optim.warmup_steps, cfg.optim.weight_decay = 3e-3, 2, 0.01
    cfg.eval.at_start = cfg.eval.at_end = False
    cfg.logging.log_interval = 100
    if ckpt:
        cfg.checkpoint.dir = str(ckpt)
    return cfg


def _fixed_batch_loss(trainer) -> float:
    """Mean LM loss of the (TP/DP-replicated) model on one fixed batch."""
    from megatron_finevit.testing.toy_stage import learnable_batch

    tokens, labels = learnable_batch(16, 4, 128, torch.Generator().manual_seed(99))
    model = trainer.model[0]
    model.eval()
    with torch.no_grad():
        out = model(tokens, torch.arange(16).unsqueeze(0).expand_as(tokens), None, labels=labels)
    return out.float().mean().item()


def trainer_world(rank, world_size, tmp):
    from megatron.core import dist_checkpointing

    from megatron_finevit.training.trainer import TooManyBadSteps, Trainer

    tmp = Path(tmp)
    out = {}
    # A: uninterrupted, DP=2 + distributed optimizer, warm-up + cosine
    out["uninterrupted"] = Trainer(_cfg()).train()["losses"]
    # B: pre-empted by SIGUSR1 (sent to rank 0 only) before step 4, then resumed
    first = Trainer(_cfg(tmp / "b", signal_at_step=4)).train()
    second = Trainer(_cfg(tmp / "b")).train()
    out["preempted"] = {"first": first, "second": second,
                        "latest": (tmp / "b" / "latest").read_text() if rank == 0 else None}
    # C: TP=2 run saved, then loaded at TP=1 x DP=2
    t_tp2 = Trainer(_cfg(tmp / "c", steps=3, tp=2))
    t_tp2.train()
    loss_tp2 = _fixed_batch_loss(t_tp2)
    t_tp1 = Trainer(_cfg(tmp / "c", steps=3, tp=1))
    out["reshard"] = {"tp2": loss_tp2, "tp1": _fixed_batch_loss(t_tp1), "step": t_tp1.state.step}
    # D: a non-finite loss skips the step; past max_bad_steps the run aborts
    skipped = Trainer(_cfg(steps=3, nan_loss_steps=[1])).train()
    cfg = _cfg(steps=3, nan_loss_steps=[0])
    cfg.max_bad_steps = 0
    try:
        Trainer(cfg).train()
        out["abort"] = None
    except TooManyBadSteps as exc:
        out["abort"] = str(exc)
    out["skipped"] = skipped
    # E: a save that dies half-way leaves `latest` on the previous checkpoint
    cfg = _cfg(tmp / "e", steps=4)
    cfg.checkpoint.save_interval = 2
    real_save = dist_checkpointing.save
    calls = {"n": 0}

    def dying_save(state, path, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            Path(path, "partial_file").write_text("half")
            raise OSError("disk vanished")
        return real_save(state, path, *args, **kwargs)

    checkpointing_save = dist_checkpointing.save
    dist_checkpointing.save = dying_save
    try:
        Trainer(cfg).train()
        out["dying"] = "no error"
    except OSError as exc:
        out["dying"] = str(exc)
    finally:
        dist_checkpointing.save = checkpointing_save
    torch.distributed.barrier()
    listing = sorted(p.name for p in (tmp / "e").iterdir())
    latest = (tmp / "e" / "latest").read_text()
    resumed = Trainer(_cfg(tmp / "e", steps=4))
    out["atomic"] = {"listing": listing, "latest": latest, "resumed_step": resumed.state.step}
    resumed.train()
    out["atomic"]["after"] = sorted(p.name for p in (tmp / "e").iterdir())
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return run_world(trainer_world, 2, args=(str(tmp_path_factory.mktemp("trainer")),), timeout_s=600)


def test_loss_falls(world):
    losses = world[1]["uninterrupted"]
    assert len(losses) == 8 and losses[-1] < losses[0] - 0.5


def test_preempted_run_resumes_exactly(world):
    for rank in (0, 1):
        b = world[rank]["preempted"]
        assert b["first"]["stopped_by_signal"] and b["first"]["state"]["step"] == 5
        assert b["second"]["state"]["step"] == 8
    b = world[1]["preempted"]  # the logging rank
    assert b["first"]["losses"] + b["second"]["losses"] == world[1]["uninterrupted"]  # bit-exact
    assert world[0]["preempted"]["latest"] == "iter_0000008"


def test_tp2_checkpoint_loads_at_tp1_dp2(world):
    for rank in (0, 1):
        r = world[rank]["reshard"]
        assert r["step"] == 3
        assert abs(r["tp2"] - r["tp1"]) <= 1e-5, r


def test_nonfinite_loss_is_skipped_and_counted(world):
    s = world[1]["skipped"]
    assert s["state"]["skipped_steps"] == 1 and s["state"]["step"] == 3
    assert len(s["losses"]) == 2
    assert "max_bad_steps=0" in world[0]["abort"]


def test_killed_save_keeps_latest(world):
    a = world[0]["atomic"]
    assert world[0]["dying"] == "disk vanished"
    assert a["latest"] == "iter_0000002"
    assert "iter_0000004.tmp" in a["listing"] and "iter_0000004" not in a["listing"]
    assert a["resumed_step"] == 2
    assert "iter_0000004" in a["after"] and "iter_0000004.tmp" not in a["after"]


def test_config_errors_are_clear(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train_steps: 5\noptim:\n  lr: 1e-3\n  typo: 1\n")
    with pytest.raises(ConfigError, match=r"optim\.typo: unknown key"):
        load_config(TrainConfig, path)
    with pytest.raises(ConfigError, match="train_steps: expected int"):
        load_config(TrainConfig, None, ["train_steps=ten"])
    cfg = load_config(TrainConfig, None, ["optim.lr=3e-4", "parallel.tensor_parallel=2"])
    assert cfg.optim.lr == 3e-4 and cfg.parallel.tensor_parallel == 2
    bad = load_config(TrainConfig, None, ["engine=deepspeed", "parallel.tensor_parallel=2"])
    with pytest.raises(ValueError, match="data parallel only"):
        bad.validate()
