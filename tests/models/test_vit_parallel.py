"""FineViT (encoder + mask token + MIM, MAP and merge-projector heads) under TP, TP+SP, CP and PP
gives the single-rank run's outputs, loss, gradients and updated weights (fp32, ≤ 1e-5): each at
2 ranks, and TP2×CP2 (+SP), TP2×PP2 and CP4 (per-image CP padding) at 4 ranks."""

import pytest

from megatron_finevit.testing.multirank import run_world
from megatron_finevit.testing.multirank import Layout
from megatron_finevit.testing.vit_parity import parallel_run, reference_run

TOL = 1e-5
RUNS_2 = [dict(tp=2), dict(tp=2, sp=True), dict(cp=2), dict(pp=2)]
RUNS_4 = [dict(tp=2, cp=2, sp=True), dict(tp=2, pp=2), dict(cp=4)]


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    ckpt = str(tmp_path_factory.mktemp("vit_parity") / "init")
    (oracle,) = run_world(reference_run, 1, args=(ckpt,))
    ranks = run_world(parallel_run, 2, args=(ckpt, oracle, RUNS_2))
    ranks += run_world(parallel_run, 4, args=(ckpt, oracle, RUNS_4), timeout_s=600)
    return oracle, ranks


@pytest.mark.parametrize("run", RUNS_2 + RUNS_4, ids=lambda kw: Layout(**kw).label)
def test_matches_single_rank(reports, run):
    oracle, ranks = reports
    label = Layout(**run).label
    per_rank = [r[label] for r in ranks if label in r]
    world = run.get("tp", 1) * run.get("pp", 1) * run.get("cp", 1)
    assert len(per_rank) == world
    for rank, d in enumerate(per_rank):
        assert d["num_params"] > 0
        assert d["grad"] <= TOL, (rank, d)
        assert d["weight"] <= TOL, (rank, d)
        assert d["grad_norm"] <= TOL * max(1.0, oracle["grad_norm"]), (rank, d)
        assert d["output"] <= TOL, (rank, d)
    last_stage = [d for d in per_rank if "loss" in d]
    assert last_stage and all(d["num_outputs"] == 8 for d in last_stage)  # 2 micro-batches x 4
    assert max(d["loss"] for d in last_stage) <= TOL


def test_oracle_trains(reports):
    oracle, _ = reports
    assert oracle["loss"] > 0 and oracle["grad_norm"] > 0
    assert len(oracle["grads"]) == 36  # encoder (2 layers) + mask token + three heads
