"""megatron's overlap features from the YAML: at DP2 with the distributed optimizer, three steps of
the toy stage with ``overlap_grad_reduce`` + ``overlap_param_gather`` (small buckets, so several
all-gathers chain through the forward pre-hooks) give the losses and weights of the run without
them, with an evaluation between steps; a save after two steps and a resume equal the
uninterrupted run (the checkpoint must hold the gathered weights, not the stale ones the
pre-hooks would gather only in the next forward, and with several buckets megatron's
fully-reshardable save needs ``RESHARDABLE_SAVE_BUCKET_PADDING``). Plus the config errors of
combinations megatron-core cannot run."""

from pathlib import Path

import pytest
import torch

from megatron_finevit.config.errors import ConfigError
from megatron_finevit.config.train import TrainConfig
from megatron_finevit.testing.multirank import run_world

STEPS = 3
BUCKET = 4096  # elements: the toy model splits into several buckets


def _cfg(overlap: bool, ckpt=None) -> TrainConfig:
    cfg = TrainConfig(stage="toy_lm", train_steps=STEPS, global_batch_size=4,
                      stage_config={"num_layers": 2})
    p = cfg.parallel
    p.distributed_optimizer = True
    p.overlap_grad_reduce = p.overlap_param_gather = overlap
    p.bucket_size = BUCKET if overlap else None
    cfg.optim.lr, cfg.optim.warmup_steps = 3e-3, 1
    cfg.eval.at_start = cfg.eval.at_end = False
    cfg.logging.log_interval = 100
    cfg.checkpoint.dir = str(ckpt) if ckpt else None
    return cfg


def _weights(trainer) -> dict:
    from megatron_finevit.training.trainer import _unwrap, params_gathered

    with params_gathered(trainer.model):
        return {n: p.detach().clone() for n, p in _unwrap(trainer.model[0]).named_parameters()}


def _run(overlap: bool, ckpt=None, steps=STEPS):
    """(losses, weights) of ``steps`` training steps, evaluating after the first."""
    from megatron_finevit.training.trainer import Trainer

    trainer = Trainer(_cfg(overlap, ckpt))
    losses = []
    while trainer.state.step < steps:
        losses.append(trainer.train_step()["loss"])
        if trainer.state.step == 1:
            trainer.evaluate()  # takes the pre-hooks off and puts them back
    return trainer, losses


def overlap_world(rank, world_size, tmp):
    from megatron_finevit.training.trainer import Trainer

    trainer, off = _run(overlap=False)
    out = {"off": (off, _weights(trainer))}
    trainer, on = _run(overlap=True)
    out["on"] = (on, _weights(trainer))
    out["buckets"] = len(trainer.model[0].bucket_groups)
    first, head = _run(overlap=True, ckpt=Path(tmp) / "ckpt", steps=2)
    first.save()
    resumed = Trainer(_cfg(True, Path(tmp) / "ckpt"))
    tail = [resumed.train_step()["loss"] for _ in range(STEPS - resumed.state.step)]
    out["resumed"] = (head + tail, _weights(resumed))
    return out


def test_overlap_equals_no_overlap_and_resumes_exactly(tmp_path):
    results = run_world(overlap_world, 2, args=(str(tmp_path),), timeout_s=300)
    for out in results:
        assert out["buckets"] > 1
        off_losses, off_weights = out["off"]
        assert len(set(off_losses)) == STEPS  # it trains
        for name in ("on", "resumed"):
            losses, weights = out[name]
            assert losses == pytest.approx(off_losses, rel=1e-6), name
            assert weights.keys() == off_weights.keys()
            for key, value in weights.items():
                # several buckets shard the gradient norm's sum differently: rounding apart
                reference = off_weights[key]
                assert (value - reference).norm() <= 1e-6 * reference.norm(), (name, key)
        # resuming with the features on equals the uninterrupted run with them on, bit for bit
        assert out["resumed"][0] == out["on"][0]
        assert all(torch.equal(out["resumed"][1][k], v) for k, v in out["on"][1].items())


@pytest.mark.parametrize("settings, message", [
    ({"overlap_param_gather": True, "overlap_grad_reduce": True, "distributed_optimizer": False},
     "parallel.overlap_param_gather needs parallel.distributed_optimizer"),
    ({"overlap_param_gather": True},
     "parallel.overlap_param_gather needs parallel.overlap_grad_reduce"),
    ({"bucket_size": 0}, "parallel.bucket_size=0 must be >= 1"),
    ({"tp_comm_overlap": True, "tensor_parallel": 2, "sequence_parallel": True},
     "parallel.tp_comm_overlap needs spec_backend te"),
    ({"tp_comm_overlap": True}, "parallel.tp_comm_overlap needs tensor_parallel >= 2"),
])
def test_invalid_combinations_are_config_errors(settings, message):
    cfg = TrainConfig(stage_config={"vit": "finevit_tiny"})
    for key, value in settings.items():
        setattr(cfg.parallel, key, value)
    with pytest.raises(ConfigError, match=message):
        cfg.validate()


def test_gradient_accumulation_fusion_refused_without_the_te_spec():
    cfg = TrainConfig()
    cfg.parallel.gradient_accumulation_fusion = True
    with pytest.raises(ConfigError, match="gradient_accumulation_fusion needs spec_backend te"):
        cfg.validate()


def test_deepspeed_refuses_megatron_ddp_keys():
    cfg = TrainConfig(engine="deepspeed")
    cfg.parallel.overlap_grad_reduce = True
    with pytest.raises(ConfigError, match="engine 'deepspeed' does not use them"):
        cfg.validate()


def test_te_spec_satisfies_tp_comm_overlap_spec_check():
    cfg = TrainConfig(stage_config={"vit_overrides": {"spec_backend": "te"}, "vit": "x"})
    p = cfg.parallel
    p.tp_comm_overlap, p.tensor_parallel, p.sequence_parallel = True, 2, True
    assert not [line for line in cfg.problems() if "tp_comm_overlap" in line]
