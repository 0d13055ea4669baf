"""FineViT-VL on packed multimodal micro-batches (several samples, each an image and text, in one
``[1, T]`` THD row): each sample's loss and gradients equal that sample run alone (fp32), padding
(a masked text tail, a padding segment after the image patches) changes nothing, and the packed
training step at TP2 + SP and at PP2 equals the single-rank one. Oracles: the unpacked
per-sample run, and the single-rank step."""

from __future__ import annotations

import pytest

from megatron_finevit.testing.finevit_vl_parity import (
    packed_layouts_world,
    packed_oracle_world,
    tiny_vl_config,
)
from megatron_finevit.testing.multirank import Layout, run_world

TOL = 1e-5
CONFIG = tiny_vl_config()
RUNS = {"tp2_sp": (CONFIG, Layout(tp=2, sp=True)), "pp2": (CONFIG, Layout(pp=2))}


@pytest.fixture(scope="module")
def worlds(tmp_path_factory):
    ckpt = str(tmp_path_factory.mktemp("vl_packed") / "init")
    (single,) = run_world(packed_oracle_world, 1, args=(CONFIG, ckpt))
    ranks = run_world(packed_layouts_world, 2, args=(ckpt, single["oracle"], RUNS))
    return single, ranks


@pytest.mark.parametrize("pack", ["packed", "padded"])
def test_pack_gives_each_sample_its_loss_and_gradients_alone(worlds, pack):
    isolation = worlds[0]["isolation"]
    assert isolation["grad_scale"] > 1e-6  # every parameter has a real gradient to compare
    diffs = isolation[pack]
    assert diffs["loss"] <= TOL, diffs
    assert diffs["token_loss"] <= TOL, diffs
    assert diffs["grad"] <= TOL, diffs


def test_comparison_sees_samples_leak_without_segments(worlds):
    # The same pack as one plain causal row: later samples attend to earlier ones. The oracle
    # must tell, or the isolation test above proves nothing.
    leak = worlds[0]["isolation"]["unsegmented"]
    assert leak["loss"] > 1e-3 and leak["grad"] > 1e-2, leak


@pytest.mark.parametrize("name", sorted(RUNS))
def test_packed_step_matches_single_rank(worlds, name):
    single, ranks = worlds
    oracle = single["oracle"]
    assert oracle["grad_norm"] > 0.1 and oracle["loss"] > 1.0  # a real step
    reports = [r["steps"][name] for r in ranks]
    losses = [r["loss"] for r in reports if "loss" in r]
    assert len(losses) == (1 if RUNS[name][1].pp > 1 else 2)
    assert max(losses) <= TOL
    for report in reports:
        assert report["grad_norm"] <= TOL
        assert report["grad"] <= TOL, report["grad"]
        assert report["weight"] <= TOL, report["weight"]
    covered = {param for report in reports for param in report["params"]}
    assert covered == set(oracle["grads"])


def test_sequence_parallel_refuses_a_budget_tp_does_not_divide(worlds):
    for rank in worlds[1]:
        assert "does not split over 2 sequence-parallel ranks" in rank["sp_refusal"]
