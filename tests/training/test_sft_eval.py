"""The SFT stage's VQA evaluation (``training.stages.sft_eval.evaluate_vqa``) on a held-out split
of the synthetic VQA set (one image corrupt), with a tiny random FineViT-VL.

- The stage is a namespace holding only what ``AlignStage`` also has (template, vl, norm,
  data_config's policy and budgets, cfg.eval_max_new_tokens), so the SFT stage can pass itself.
- Wiring: with generation replaced by a fixed answer ("Three."), the accuracies are the
  fractions of references that answer matches, computed here from the shards' JSON; the
  baselines and counts too.
- The real greedy path: every key, sane ranges, the corrupt image counted; DP2 and TP2 return the
  single rank's dict on every rank.
"""

from __future__ import annotations

import types
from collections import Counter

import pytest

from megatron_finevit.testing.multirank import Layout, run_world

MAX_NEW = 4
IMAGES, BROKEN = 8, "00000002"
LAYOUTS = [Layout(), Layout(tp=2)]  # 2 ranks: DP2, TP2


def _config():
    from dataclasses import replace

    from megatron_finevit.config.vlm import tiny_finevit_vl

    config = tiny_finevit_vl()
    return replace(config, llm=replace(config.llm, num_layers=2))


def _stage(config):
    from megatron_finevit.data.decode_pil import Normalization
    from megatron_finevit.data.resize import ResizePolicy
    from megatron_finevit.data.tasks.chat import Qwen3ChatTemplate
    from megatron_finevit.data.tokenizers import QwenTokenizer

    return types.SimpleNamespace(
        data_config=types.SimpleNamespace(policy=ResizePolicy(max_pixels=112 * 112),
                                          llm_tokens=256, vit_tokens=256),
        template=Qwen3ChatTemplate(QwenTokenizer.from_tiktoken()), vl=config,
        norm=Normalization(), cfg=types.SimpleNamespace(eval_max_new_tokens=MAX_NEW))


def _wrap(model):
    """DDP, as the trainer hands models to a stage."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    return DistributedDataParallel(model.config, DistributedDataParallelConfig(), model)


def single_world(rank, world_size, ckpt_dir, eval_dir):
    from unittest import mock

    from megatron_finevit.testing.finevit_vl_parity import build_model
    from megatron_finevit.testing.gpt_parity import save_checkpoint
    from megatron_finevit.training.stages.sft_eval import evaluate_vqa

    config = _config()
    model = build_model(config, Layout())
    save_checkpoint(model, ckpt_dir)
    model, stage = _wrap(model), _stage(config)
    out = {"eval": evaluate_vqa(stage, [model], eval_dir),
           "limited": evaluate_vqa(stage, [model], eval_dir, max_samples=3)}
    three = stage.template.tokenizer.encode("Three.")
    with mock.patch("megatron_finevit.evaluation.generation.greedy_generate",
                    lambda chunks, requests, **_: [three] * len(requests)):
        out["fixed"] = evaluate_vqa(stage, [model], eval_dir)
    return out


def layouts_world(rank, world_size, ckpt_dir, eval_dir):
    from megatron_finevit.testing.finevit_vl_parity import build_model
    from megatron_finevit.testing.gpt_parity import load_checkpoint
    from megatron_finevit.training.stages.sft_eval import evaluate_vqa

    config, out = _config(), {}
    for layout in LAYOUTS:
        model = build_model(config, layout, perform_initialization=False)
        load_checkpoint(model, ckpt_dir)
        out[layout.label] = evaluate_vqa(_stage(config), [_wrap(model)], eval_dir)
    return out


@pytest.fixture(scope="module")
def worlds(tmp_path_factory):
    from megatron_finevit.data.index import build_index
    from megatron_finevit.data.synthetic import make_synthetic_shards
    from megatron_finevit.data.synthetic_vqa import write_vqa_shards
    from megatron_finevit.testing.corrupt_shards import truncate_image_bodies

    root = tmp_path_factory.mktemp("sft_eval")
    make_synthetic_shards(root / "src", IMAGES, seed=2, progress=False)
    eval_dir = root / "eval"
    write_vqa_shards(root / "src", eval_dir, "eval", seed=0, progress=False)
    build_index(eval_dir, progress=False)
    truncate_image_bodies(eval_dir, [BROKEN])
    ckpt_dir = str(root / "ckpt")
    (single,) = run_world(single_world, 1, args=(ckpt_dir, str(eval_dir)))
    ranks = run_world(layouts_world, 2, args=(ckpt_dir, str(eval_dir)))
    return dict(single=single, ranks=ranks, eval_dir=eval_dir)


def _references(eval_dir, images: int) -> list[tuple[str, str]]:
    """(kind, answer) of every question of the first ``images`` samples but the corrupt one."""
    from megatron_finevit.data.shards import iter_shard_samples, list_shards

    metas = [(key, meta) for path in list_shards(eval_dir)
             for key, _, meta, _ in iter_shard_samples(path)][:images]
    return [(kind, turn["content"][0]["text"]) for key, meta in metas if key != BROKEN
            for kind, turn in zip(meta["vqa_kinds"], meta["conversation"][1::2])]


def _majority_hits(answers: list[str]) -> int:
    counts = Counter(a.lower() for a in answers)
    return max(counts.values())


def test_fixed_answers_are_scored_against_the_references(worlds):
    got = worlds["single"]["fixed"]
    references = _references(worlds["eval_dir"], IMAGES)
    kinds = Counter(kind for kind, _ in references)
    assert set(kinds) == {"count", "color", "read"}
    assert got["vqa_n"] == len(references) and got["vqa_skipped"] == 1
    threes = sum(answer == "3" for kind, answer in references if kind == "count")
    assert threes > 0
    assert got["vqa_acc"] == pytest.approx(threes / len(references))
    assert got["vqa_acc_count"] == pytest.approx(threes / kinds["count"])
    assert got["vqa_acc_color"] == got["vqa_acc_read"] == 0.0
    majority = 0
    for kind, n in kinds.items():
        hits = _majority_hits([answer for k, answer in references if k == kind])
        assert got[f"vqa_n_{kind}"] == n
        assert got[f"vqa_baseline_{kind}"] == pytest.approx(hits / n)
        majority += hits
    assert got["vqa_baseline"] == pytest.approx(majority / len(references))


def test_greedy_answers_report_every_metric(worlds):
    results, fixed = worlds["single"]["eval"], worlds["single"]["fixed"]
    assert set(results) == set(fixed)  # every kind asked, whatever is answered
    assert {k: v for k, v in results.items() if "_acc" not in k} == {
        k: v for k, v in fixed.items() if "_acc" not in k}  # the model changes only accuracy
    for key, value in results.items():
        if "_acc" in key:
            assert 0.0 <= value <= 1.0, key
    limited = worlds["single"]["limited"]
    assert limited["vqa_n"] == len(_references(worlds["eval_dir"], 3))
    assert limited["vqa_skipped"] == 1  # the corrupt image is the third


@pytest.mark.parametrize("layout", LAYOUTS, ids=["dp2", "tp2"])
def test_evaluate_vqa_at_any_layout_equals_single_rank(worlds, layout):
    for rank in worlds["ranks"]:
        assert rank[layout.label] == worlds["single"]["eval"]
