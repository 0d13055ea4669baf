"""Stage II ``loss_scope: step`` (the gradient cache): one SigLIP loss over every pair of the
step. At DP=2 × 4 micro-batches (packs holding different numbers of images) the step's loss and
every parameter's gradient equal one autograd forward over all 8 micro-batches' pairs with the
full-matrix loss; 3 trainer steps (text tower unfrozen at step 1) give the losses and weights of
a single-rank run over the same global batches; TP2 + SP and CP2 give those single-rank losses too; a resume from the step-1 checkpoint is
exact;
megatron's overlapped, bucketed gradient reduction gives the same losses; pipeline parallelism is
refused with a one-line config error."""

import pickle
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from megatron_finevit.testing.multirank import run_world
from megatron_finevit.testing.stage_assets import make_stage_assets, tiny_run

STEPS, GLOBAL_BATCH, UNFREEZE_AT, CHECK_STEP = 3, 8, 1, 1
RTOL = 1e-5


def _cfg(assets, ckpt=None, **overrides):
    cfg = tiny_run("contrastive", assets, steps=STEPS, global_batch=GLOBAL_BATCH,
                   unfreeze_text_at=UNFREEZE_AT, loss_scope="step", **overrides)
    cfg.parallel.distributed_optimizer = False  # every rank holds the whole reduced gradient
    cfg.stage_config["data"]["decoder"] = "pil"  # the reference decoder, whatever the default
    cfg.checkpoint.dir, cfg.checkpoint.save_interval = ckpt, 1 if ckpt else 0
    cfg.checkpoint.keep_last = STEPS
    return cfg


def _weights(trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.stage.module.named_parameters()}


def _reference(stage, batches) -> tuple[float, dict[str, torch.Tensor]]:
    """Full-matrix SigLIP over every pair of ``batches`` in one autograd graph (no DDP):
    (loss, gradient of each parameter)."""
    module = stage.module
    out = [module(*stage.model_input(b), embeddings=True) for b in batches]
    image, text = (torch.cat([o[k] for o in out]) for k in ("image", "text"))
    logits = module.siglip.logit_scale.exp() * image @ text.T + module.siglip.logit_bias
    labels = 2 * torch.eye(len(image)) - 1
    loss = -F.logsigmoid(labels * logits).sum() / len(image)
    names, params = zip(*module.named_parameters())
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return loss.item(), {n: torch.zeros_like(p) if g is None else g
                         for n, p, g in zip(names, params, grads)}


def _record(trainer, steps: list) -> None:
    """Keep each step's micro-batches (what ``prepare_step`` fetched) in ``steps``."""
    stage, prepare = trainer.stage, trainer.stage.prepare_step

    def recording(data, chunks, num):
        batches = list(prepare(data, chunks, num))
        steps.append(batches)
        return iter(batches)

    stage.prepare_step = recording


def dp2_world(rank, world_size, assets, tmp):
    import torch.distributed as dist

    from megatron_finevit.training.trainer import Trainer

    ckpt, out, steps = str(Path(tmp) / "ckpt"), {}, []
    trainer = Trainer(_cfg(assets, ckpt))
    _record(trainer, steps)
    optimizer_step = trainer.optimizer.step

    def checked_step():
        if trainer.state.step == CHECK_STEP:  # the schedule ran, the update has not
            out["grads"] = {n: p.main_grad.clone()
                            for n, p in trainer.model[0].module.named_parameters()}
            every = [None] * world_size
            dist.all_gather_object(every, steps[-1])
            out["pairs"] = [b.num_images for rank_batches in every for b in rank_batches]
            out["ref_loss"], out["ref_grads"] = _reference(trainer.stage, sum(every, []))
        return optimizer_step()

    trainer.optimizer.step = checked_step
    out["losses"] = trainer.train()["losses"]
    out["weights"] = _weights(trainer)
    every = [None] * world_size
    dist.all_gather_object(every, steps)
    if rank == 0:  # the global batches, in the order a single rank would read them
        with open(Path(tmp) / "batches.pkl", "wb") as f:
            pickle.dump([sum((r[s] for r in every), []) for s in range(STEPS)], f)
    # resume from the checkpoint of step 1 alone (the step the text tower unfreezes)
    alone = Path(tmp) / "from_1"
    if rank == 0:
        shutil.copytree(Path(ckpt) / "iter_0000001", alone / "iter_0000001")
        (alone / "latest").write_text("iter_0000001")
    dist.barrier()
    resumed = Trainer(_cfg(assets, str(alone)))
    out["resumed_losses"] = resumed.train()["losses"]
    out["resumed_weights"] = _weights(resumed)
    return out


def overlap_world(rank, world_size, assets, tmp):
    """megatron's overlapped, bucketed gradient reduction (every parameter of a bucket must report
    its gradient in the last micro-batch: t and b, and the text tower while frozen, too). A world
    of its own: its asynchronous gloo collectives run in a process holding no other trainer's
    process groups (one CI run lost a rank to a segfault here when it was dp2_world's third
    trainer; its cause is not known)."""
    from megatron_finevit.training.trainer import Trainer

    cfg = _cfg(assets)
    p = cfg.parallel
    p.distributed_optimizer = p.overlap_grad_reduce = p.overlap_param_gather = True
    p.bucket_size = 2000  # several buckets mixing the towers' and the loss's parameters
    return Trainer(cfg).train()["losses"]


def dp1_world(rank, world_size, assets, tmp):
    """The same global batches on one rank: 8 micro-batches per step, one loss over them."""
    from megatron_finevit.training.metrics import DataWaitTimer
    from megatron_finevit.training.trainer import Trainer

    with open(Path(tmp) / "batches.pkl", "rb") as f:
        batches = [b for step in pickle.load(f) for b in step]
    trainer = Trainer(_cfg(assets))
    trainer.data = DataWaitTimer(iter(batches))
    return {"losses": trainer.train()["losses"], "weights": _weights(trainer)}


def tp_cp_world(rank, world_size, assets, tmp):
    """The same global batches at TP2 + SP and at CP2 (DP 1): the step's loss over all of them
    with the image tokens split over the TP or CP ranks."""
    from megatron_finevit.training.metrics import DataWaitTimer
    from megatron_finevit.training.trainer import Trainer

    with open(Path(tmp) / "batches.pkl", "rb") as f:
        batches = [b for step in pickle.load(f) for b in step]
    out = {}
    for name, layout in (("tp2_sp", dict(tp=2, sp=True)), ("cp2", dict(cp=2))):
        trainer = Trainer(_cfg(assets, **layout))
        trainer.data = DataWaitTimer(iter(batches))
        out[name] = trainer.train()["losses"]
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("step_scope")
    assets = make_stage_assets(root / "assets")
    dp2 = run_world(dp2_world, 2, args=(assets, str(root)))
    for rank, losses in zip(dp2, run_world(overlap_world, 2, args=(assets, str(root)))):
        rank["overlap_losses"] = losses
    (dp1,) = run_world(dp1_world, 1, args=(assets, str(root)))
    dp1["layouts"] = run_world(tp_cp_world, 2, args=(assets, str(root)))
    return dp2, dp1


@pytest.mark.parametrize("layout", ["tp2_sp", "cp2"])
def test_tp_and_cp_give_the_single_rank_step_losses(results, layout):
    _, dp1 = results
    for rank in dp1["layouts"]:
        assert rank[layout] == pytest.approx(dp1["losses"], rel=RTOL), layout


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want.double()).norm() / want.double().norm().clamp(min=1e-30)).item()


def test_step_loss_and_gradients_equal_one_forward_over_all_pairs(results):
    dp2, _ = results
    pairs = dp2[0]["pairs"]
    assert len(pairs) == GLOBAL_BATCH and len(set(pairs)) > 1, pairs  # unequal pack fills
    for r in dp2:
        assert r["losses"][CHECK_STEP] == pytest.approx(r["ref_loss"], rel=RTOL)
        assert set(r["grads"]) == set(r["ref_grads"])
        for name, want in r["ref_grads"].items():
            assert want.norm() > 0, name  # every parameter trains at this step (tower unfrozen)
            assert _rel(r["grads"][name], want) <= RTOL, (name, _rel(r["grads"][name], want))


def test_dp2_trainer_equals_single_rank_full_batch(results):
    dp2, dp1 = results
    assert dp2[0]["losses"] == dp2[1]["losses"]
    assert dp2[0]["losses"] == pytest.approx(dp1["losses"], rel=RTOL)
    flat = [torch.cat([w[n].flatten() for n in sorted(w)]) for w in (dp2[0]["weights"],
                                                                     dp1["weights"])]
    assert _rel(*flat) <= RTOL
    # per tensor looser: Adam divides each element's gradient by its own running scale, which
    # magnifies float noise in near-zero gradients of tensors that start at zero (biases)
    for name, want in dp1["weights"].items():
        assert _rel(dp2[0]["weights"][name], want) <= 1e-3, name


def test_resume_is_exact(results):
    for r in results[0]:
        assert r["resumed_losses"] == r["losses"][1:]
        for name, want in r["weights"].items():
            assert torch.equal(r["resumed_weights"][name], want), name


def test_overlapped_grad_reduce_gives_the_same_losses(results):
    for r in results[0]:
        assert r["overlap_losses"] == pytest.approx(r["losses"], rel=1e-6)


def test_pipeline_parallel_is_a_config_error():
    from megatron_finevit.config.errors import ConfigError
    from megatron_finevit.training.stages.contrastive import ContrastiveStage

    assets = {"train": "/nonexistent/train", "tokenizer": "/nonexistent/tok.model"}
    with pytest.raises(ConfigError) as err:
        ContrastiveStage(tiny_run("contrastive", assets, steps=1, pp=2, loss_scope="step"))
    message = str(err.value)
    assert "stage_config.loss_scope" in message and "\n" not in message.strip(), message
    ContrastiveStage(tiny_run("contrastive", assets, steps=1, pp=2))  # micro_batch: fine


def test_chunked_block_equals_one_block(monkeypatch):
    """A block scored in row chunks (the bound on logits memory) gives the one-block loss and
    gradients: embeddings, logit_scale, logit_bias (through ``loss_and_embedding_grads``)."""
    from megatron_finevit.losses import siglip

    gen = torch.Generator().manual_seed(0)
    image = F.normalize(torch.randn(11, 8, generator=gen, dtype=torch.float64), dim=-1)
    text = F.normalize(image + torch.randn(11, 8, generator=gen, dtype=torch.float64), dim=-1)

    def run():
        loss = siglip.SigLIPLoss(1.0, -2.0).double()
        value, g_image, g_text = siglip.loss_and_embedding_grads(loss, image, text, None)
        return [value, g_image, g_text, loss.logit_scale.grad, loss.logit_bias.grad]

    whole = run()
    monkeypatch.setattr(siglip, "CHUNK_LOGITS", 3 * 11)  # 3 rows per chunk: 4 chunks
    assert len(siglip._row_chunks(11, 11)) == 4
    for got, want in zip(run(), whole):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
