"""FineViT-VL trains the same at every layout: one Adam step over two micro-batches (different
images, text-only loss through megatron's vocab-parallel cross-entropy) at TP2 + SP and at PP2
(encoder on the first stage, tied embedding split between the stages) against the single-rank
step: loss, grad norm, every gradient and every updated weight (fp32)."""

from __future__ import annotations

import pytest

from megatron_finevit.testing.finevit_vl_parity import (
    tiny_vl_config,
    train_layouts_world,
    train_oracle_world,
)
from megatron_finevit.testing.multirank import run_world
from megatron_finevit.testing.qwen3_parity import Layout

TOL = 1e-5
LAYOUTS = [Layout(tp=2, sp=True), Layout(pp=2)]


@pytest.fixture(scope="module")
def steps(tmp_path_factory):
    ckpt = str(tmp_path_factory.mktemp("vl_train") / "init")
    config = tiny_vl_config()
    (oracle,) = run_world(train_oracle_world, 1, args=(config, ckpt))
    ranks = run_world(train_layouts_world, 2, args=(config, ckpt, oracle, LAYOUTS))
    return oracle, ranks


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda layout: layout.label)
def test_one_step_matches_single_rank(steps, layout):
    oracle, ranks = steps
    assert oracle["grad_norm"] > 0.1 and oracle["loss"] > 1.0  # a real step
    reports = [r[layout.label] for r in ranks]
    losses = [r["loss"] for r in reports if "loss" in r]
    assert len(losses) == (1 if layout.pp > 1 else 2)
    for report in reports:
        assert max(losses) <= TOL
        assert report["grad_norm"] <= TOL
        assert report["grad"] <= TOL, report["grad"]
        assert report["weight"] <= TOL, report["weight"]
    # every parameter of the single-rank model is held (and checked) somewhere
    covered = {name for report in reports for name in report["params"]}
    assert covered == set(oracle["grads"])
    # PP: the encoder and projector live on the first stage only
    if layout.pp > 1:
        first, last = (set(r["params"]) for r in reports)
        assert any(n.startswith("encoder.") for n in first)
        assert not any(n.startswith(("encoder.", "projector.")) for n in last)
