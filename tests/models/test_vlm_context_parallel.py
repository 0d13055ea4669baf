"""FineViT-VL under context parallelism trains as one rank: one Adam step over two packed
multimodal micro-batches (THD, every sample padded to a multiple of 2·cp = 4 tokens as the loader
pads it, images of different sizes, text-only loss) at CP2 (2 ranks), TP2 × CP2 with sequence
parallelism and PP2 × CP2 (4 ranks) against the single-rank step on the same packs: loss, grad
norm, every gradient and every updated weight (fp32). The LM runs THD under CP with the
placeholders filled before the split; the encoder runs with its own CP (``models.vlm``).

Also: the model refuses a pack whose segments do not split in 2·cp chunks, and towers built for
another CP size than the world's."""

from __future__ import annotations

import pytest

from megatron_finevit.testing.finevit_vl_parity import (
    build_model,
    packed_train_microbatches,
    tiny_vl_config,
    train_layouts_world,
    train_oracle_world,
)
from megatron_finevit.testing.multirank import Layout, run_world

TOL = 1e-5
CONFIG = tiny_vl_config()
SEGMENT_MULTIPLE = 4  # 2·cp
RUNS_2 = {"cp2": (CONFIG, Layout(cp=2))}
RUNS_4 = {"tp2_cp2_sp": (CONFIG, Layout(tp=2, cp=2, sp=True)),
          "pp2_cp2": (CONFIG, Layout(pp=2, cp=2))}


def refusals_world(rank: int, world_size: int, config) -> dict:
    """The errors of a CP2 model for a pack with a 9-token sample, and of towers built at CP 1
    in a CP2 world."""
    from megatron_finevit.models.vlm import FineViTVLModel

    model = build_model(config, Layout(cp=2))
    batch = packed_train_microbatches(config)[0]  # samples of 11, 9, 10 tokens: not padded
    out = {}
    try:
        model(batch["images"], batch["ids"], batch["positions"], labels=batch["labels"],
              packed_seq_params=batch["params"])
        out["segments"] = ""
    except ValueError as exc:
        out["segments"] = str(exc)
    try:
        FineViTVLModel(config, *config.to_transformer_configs())
        out["towers"] = ""
    except ValueError as exc:
        out["towers"] = str(exc)
    return out


def cp2_world(rank: int, world_size: int, ckpt_dir: str, oracle: dict) -> dict:
    return {"steps": train_layouts_world(rank, world_size, ckpt_dir, oracle, RUNS_2, packed=True,
                                         segment_multiple=SEGMENT_MULTIPLE),
            "refusals": refusals_world(rank, world_size, CONFIG)}


@pytest.fixture(scope="module")
def steps(tmp_path_factory):
    ckpt = str(tmp_path_factory.mktemp("vl_cp") / "init")
    (oracle,) = run_world(train_oracle_world, 1, args=(CONFIG, ckpt, True, SEGMENT_MULTIPLE))
    pair = run_world(cp2_world, 2, args=(ckpt, oracle))
    quad = run_world(train_layouts_world, 4, args=(ckpt, oracle, RUNS_4, True, SEGMENT_MULTIPLE),
                     timeout_s=600)
    reports = {name: [r["steps"][name] for r in pair] for name in RUNS_2}
    reports.update({name: [r[name] for r in quad] for name in RUNS_4})
    return oracle, reports, pair


def test_packs_pad_every_sample_to_2cp():
    for batch in packed_train_microbatches(CONFIG, SEGMENT_MULTIPLE):
        cu = batch["params"].cu_seqlens_q
        assert ((cu[1:] - cu[:-1]) % SEGMENT_MULTIPLE == 0).all()
        assert len(cu) > 3  # several samples and a padding tail


@pytest.mark.parametrize("name", sorted(RUNS_2) + sorted(RUNS_4))
def test_one_step_matches_single_rank(steps, name):
    oracle, reports, _ = steps
    assert oracle["grad_norm"] > 0.1 and oracle["loss"] > 1.0  # a real step
    layout = {**RUNS_2, **RUNS_4}[name][1]
    losses = [report["loss"] for report in reports[name] if "loss" in report]
    assert len(losses) == len(reports[name]) // layout.pp  # every CP rank holds the whole loss
    for report in reports[name]:
        assert max(losses) <= TOL
        assert report["grad_norm"] <= TOL
        assert report["grad"] <= TOL, report["grad"]
        assert report["weight"] <= TOL, report["weight"]
    covered = {param for report in reports[name] for param in report["params"]}
    assert covered == set(oracle["grads"])
    assert any(param.startswith("encoder.") for param in covered)


def test_refusals_name_the_problem(steps):
    _, _, pair = steps
    for rank in pair:
        assert "every packed segment to be a multiple of 2*cp = 4" in rank["refusals"]["segments"]
        assert "must be the CP world size 2" in rank["refusals"]["towers"]
