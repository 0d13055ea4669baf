"""The training loop: exact resume after pre-emption (with dropout drawing random numbers and
named optimiser groups, one frozen across the resume point), loading at another parallel layout
(one more step there equals the saving layout's), atomic checkpoints, non-finite-loss skipping,
config errors."""

from pathlib import Path

import pytest
import torch

from megatron_finevit.config.loader import ConfigError, load_config
from megatron_finevit.config.train import TrainConfig
from megatron_finevit.testing.multirank import run_world

# Named groups as a Stage III has them: one with its own peak lr, one equal to the default group
# in every setting megatron matches saved groups by, frozen until after the resume point.
GROUPS = {"embedding": {"params": "*embedding*", "max_lr": 6e-3},
          "first_layer": {"params": "*decoder.layers.0.*", "frozen_before": 6}}
HARD = {"dropout": 0.1, "param_groups": GROUPS}  # the resume scenario's stage options


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


def _dropout_is_active(trainer) -> bool:
    """Two training-mode forwards of one batch differ (dropout draws random numbers)."""
    from megatron_finevit.testing.toy_stage import learnable_batch

    tokens, labels = learnable_batch(16, 2, 128, torch.Generator().manual_seed(5))
    positions = torch.arange(16).unsqueeze(0).expand_as(tokens)
    with torch.no_grad():
        a, b = (trainer.model[0](tokens, positions, None, labels=labels) for _ in range(2))
    return not torch.equal(a, b)


def _fixed_step(trainer, dp_rank: int, dp_size: int) -> dict:
    """One more optimiser step on 4 fixed micro-batches (this DP rank's share): its metrics and
    ``moved``, the largest change of a weight."""
    from megatron_finevit.testing.toy_stage import learnable_batch

    batches = [learnable_batch(16, 2, 128, torch.Generator().manual_seed(500 + i))
               for i in range(4)]
    share = 4 // dp_size
    trainer.model[0].train()
    trainer.data = iter({"tokens": t, "labels": l}
                        for t, l in batches[dp_rank * share:(dp_rank + 1) * share])
    before = [p.detach().clone() for p in trainer.model[0].parameters()]
    metrics = trainer.train_step()
    metrics["moved"] = max((p.detach() - b).abs().max().item()
                           for p, b in zip(trainer.model[0].parameters(), before))
    return metrics


def _reshard_world(tmp: Path) -> dict:
    """A TP=2 run saved after 3 of 6 steps and loaded at TP=1 x DP=2: the same model, and one
    more step on the same data gives the same loss, grad norm and weights at both layouts."""
    from megatron.core import parallel_state as ps

    from megatron_finevit.testing.gpt_parity import global_name, step_diffs
    from megatron_finevit.training.trainer import Trainer, _unwrap

    t_tp2 = Trainer(_cfg(tmp / "c", steps=6, tp=2))
    for _ in range(3):
        t_tp2.train_step()
    t_tp2.save()
    loss_tp2 = _fixed_batch_loss(t_tp2)
    tp2_rank = ps.get_tensor_model_parallel_rank()
    step_tp2 = _fixed_step(t_tp2, 0, 1)
    t_tp1 = Trainer(_cfg(tmp / "c", steps=6, tp=1))
    out = {"tp2": loss_tp2, "tp1": _fixed_batch_loss(t_tp1), "step": t_tp1.state.step}
    step_tp1 = _fixed_step(t_tp1, ps.get_data_parallel_rank(), ps.get_data_parallel_world_size())
    tp1 = _unwrap(t_tp1.model[0])
    oracle = {"loss": step_tp1["loss"], "grad_norm": step_tp1["grad_norm"],
              "weights": {global_name(tp1, n): p.detach() for n, p in tp1.named_parameters()}}
    diffs = step_diffs(_unwrap(t_tp2.model[0]), step_tp2["loss"], step_tp2["grad_norm"], {},
                       oracle, tp=2, tp_rank=tp2_rank, check_grads=False)
    out["extra_step"] = {**diffs, "num_params": len(diffs.pop("params")),
                         "lr": step_tp1["lr"], "moved": step_tp1["moved"]}
    return out


def trainer_world(rank, world_size, tmp):
    from megatron.core import dist_checkpointing

    from megatron_finevit.testing.toy_stage import instrument_steps
    from megatron_finevit.training.trainer import TooManyBadSteps, Trainer

    tmp = Path(tmp)
    out = {}
    # A: uninterrupted, DP=2 + distributed optimizer, warm-up + cosine, dropout, named groups
    uninterrupted = Trainer(_cfg(**HARD))
    out["groups"] = instrument_steps(uninterrupted)
    out["uninterrupted"] = uninterrupted.train()["losses"]
    out["dropout_active"] = _dropout_is_active(uninterrupted)  # after: it draws random numbers
    # B: pre-empted by SIGUSR1 (sent to rank 0 only) before step 4, then resumed at step 5:
    # dropout's random streams and the frozen group's settings must come back
    first = Trainer(_cfg(tmp / "b", signal_at_step=4, **HARD)).train()
    resumed = Trainer(_cfg(tmp / "b", **HARD))
    resumed_groups = instrument_steps(resumed)
    second = resumed.train()
    out["preempted"] = {"first": first, "second": second, "groups": resumed_groups,
                        "latest": (tmp / "b" / "latest").read_text() if rank == 0 else None}
    # C: TP=2 run saved, then loaded at TP=1 x DP=2 and stepped once more
    out["reshard"] = _reshard_world(tmp)
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
    assert world[0]["dropout_active"] and world[1]["dropout_active"]


def test_preempted_run_resumes_exactly(world):
    for rank in (0, 1):
        b = world[rank]["preempted"]
        assert b["first"]["stopped_by_signal"] and b["first"]["state"]["step"] == 5
        assert b["second"]["state"]["step"] == 8
    b = world[1]["preempted"]  # the logging rank
    assert b["first"]["losses"] + b["second"]["losses"] == world[1]["uninterrupted"]  # bit-exact
    assert world[0]["preempted"]["latest"] == "iter_0000008"


def test_resumed_groups_equal_uninterrupted(world):
    """After the load, before and after the frozen group's unfreeze at step 6, every group holds
    the uninterrupted run's parameters, lr, weight decay and scheduler keys."""
    for rank in (0, 1):
        uninterrupted, resumed = world[rank]["groups"], world[rank]["preempted"]["groups"]
        assert len(resumed) == 3 and resumed == uninterrupted[5:]  # steps 5, 6, 7
    # Each rank updates its shard of the parameters (distributed optimizer): look at both.
    step5, step6 = ([g for rank in (0, 1) for g in world[rank]["preempted"]["groups"][i]
                     if g["members"]] for i in (0, 1))
    lr5 = {g["name"]: g["lr"] for g in step5}
    assert set(lr5) == {None, "embedding", "first_layer"}
    assert lr5["first_layer"] == 0.0  # still frozen at step 5
    assert lr5["embedding"] > lr5[None] > 0.0  # its own peak lr
    assert all(g["lr"] > 0.0 for g in step6)  # unfrozen at step 6
    assert all(".layers.0." in n for g in step5 if g["name"] == "first_layer"
               for n in g["members"])
    assert not any(".layers.0." in n for g in step5 if g["name"] != "first_layer"
                   for n in g["members"])


def test_tp2_checkpoint_loads_at_tp1_dp2(world):
    for rank in (0, 1):
        r = world[rank]["reshard"]
        assert r["step"] == 3
        assert abs(r["tp2"] - r["tp1"]) <= 1e-5, r
        # one more step at both layouts: optimiser state and schedule came back
        e = r["extra_step"]
        assert e["num_params"] > 0 and e["lr"] > 0.0 and e["moved"] > 1e-4, e
        assert e["grad_norm"] <= 1e-5 and e["weight"] <= 1e-5, e
        assert e.get("loss", 0.0) <= 1e-5, e


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
