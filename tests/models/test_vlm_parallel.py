"""FineViT-VL trains the same at every layout: one Adam step over two micro-batches (different
images, text-only loss through megatron's vocab-parallel cross-entropy) at TP2 + SP, at PP2 and
at PP2 with an uneven split (1 of the 4 LM layers on the encoder's stage) — encoder on the first
stage, tied embedding split between the stages — against the single-rank step: loss, grad norm,
every gradient and every updated weight (fp32)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from megatron_finevit.testing.finevit_vl_parity import (
    tiny_vl_config,
    train_layouts_world,
    train_oracle_world,
)
from megatron_finevit.testing.multirank import run_world
from megatron_finevit.testing.multirank import Layout

TOL = 1e-5
CONFIG = tiny_vl_config()
RUNS = {"tp2_sp": (CONFIG, Layout(tp=2, sp=True)), "pp2": (CONFIG, Layout(pp=2)),
        "pp2_first_stage_1_layer": (replace(CONFIG, first_stage_llm_layers=1), Layout(pp=2))}


@pytest.fixture(scope="module")
def steps(tmp_path_factory):
    ckpt = str(tmp_path_factory.mktemp("vl_train") / "init")
    (oracle,) = run_world(train_oracle_world, 1, args=(CONFIG, ckpt))
    ranks = run_world(train_layouts_world, 2, args=(ckpt, oracle, RUNS))
    return oracle, ranks


@pytest.mark.parametrize("name", sorted(RUNS))
def test_one_step_matches_single_rank(steps, name):
    oracle, ranks = steps
    layout = RUNS[name][1]
    assert oracle["grad_norm"] > 0.1 and oracle["loss"] > 1.0  # a real step
    reports = [r[name] for r in ranks]
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
        first_layers = {n.split(".")[3] for n in first if n.startswith("llm.decoder.layers.")}
        assert len(first_layers) == (RUNS[name][0].first_stage_llm_layers or 2)
