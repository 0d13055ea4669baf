"""Greedy generation through megatron (``evaluation.generation``) and the Stage III evaluation
(``training.stages.align_eval``) on tiny random FineViT-VL models.

- Oracle: transformers' ``generate(do_sample=False)`` on the HF export of the same weights gives
  the same ids for three requests (different image sizes and prompt lengths) packed together,
  with and without a stop id that ends one of them early; several packs (LLM or ViT budget) give
  the same ids as one.
- Layouts: TP2 + SP and PP2 give the single rank's ids.
- Each pack's images go through the encoder once, not once per generated token.
- ``evaluate_align`` over synthetic held-out images, one of them corrupt: every key, sane
  ranges, the corrupt image counted; DP2 and PP2 return the single rank's dict on every rank.
"""

from __future__ import annotations

import types

import pytest
import torch

from megatron_finevit.testing.multirank import Layout, run_world

MAX_NEW = 6
SEQ_LENGTH = 64  # the three requests (20 + 17 + 17 tokens) in one pack; even for TP2 + SP
REQUESTS = [((56, 84), 8), ((28, 56), 9), ((56, 56), 7)]  # (image (H, W), text tokens)
GEN_LAYOUTS = [Layout(tp=2, sp=True), Layout(pp=2)]
EVAL_IMAGES, BROKEN = 6, "00000001"
EVAL_LAYOUTS = [Layout(), Layout(pp=2)]  # 2 ranks: DP2, PP2


def _requests(config):
    """Prompts: 3 text ids, one placeholder per merge window, the rest text (random ids)."""
    from megatron_finevit.evaluation.generation import GenerationRequest

    generator = torch.Generator().manual_seed(11)
    requests = []
    for (h, w), text in REQUESTS:
        image = torch.randn(3, h, w, generator=generator)
        ids = torch.randint(config.image_token_id + 1, config.llm.vocab_size, (text,),
                            generator=generator).tolist()
        requests.append(GenerationRequest(image, ids[:3] + [config.image_token_id]
                                          * (h * w // 28 ** 2) + ids[3:]))
    return requests


def _gen_config():
    """The transformers test shapes, untied: a tied random model repeats its input token."""
    from dataclasses import replace

    from megatron_finevit.testing.finevit_vl_parity import tiny_vl_config

    config = tiny_vl_config()
    return replace(config, llm=replace(config.llm, tie_embeddings=False))


def _eval_config():
    from dataclasses import replace

    from megatron_finevit.config.vlm import tiny_finevit_vl

    config = tiny_finevit_vl()
    return replace(config, llm=replace(config.llm, num_layers=2))


def _stage(config):
    """The attributes of the align stage ``evaluate_align`` reads."""
    from megatron_finevit.data.decode_pil import Normalization
    from megatron_finevit.data.resize import ResizePolicy
    from megatron_finevit.data.tasks.boxes import BoxCodec
    from megatron_finevit.data.tasks.chat import Qwen3ChatTemplate
    from megatron_finevit.data.tasks.region_qa_loader import RegionQAConfig
    from megatron_finevit.data.tokenizers import QwenTokenizer

    return types.SimpleNamespace(
        data_config=RegionQAConfig(llm_tokens=256, vit_tokens=256, seed=3,
                                   policy=ResizePolicy(max_pixels=112 * 112)),
        template=Qwen3ChatTemplate(QwenTokenizer.from_tiktoken()), codec=BoxCodec(), vl=config,
        norm=Normalization(), cfg=types.SimpleNamespace(eval_max_new_tokens=MAX_NEW))


def _generate(model, config, requests, stop_ids=(), seq_length=SEQ_LENGTH, vit_tokens=None):
    from megatron_finevit.evaluation.generation import greedy_generate

    return greedy_generate([model], requests, max_new_tokens=MAX_NEW, seq_length=seq_length,
                           vocab_size=config.llm.vocab_size, pad_id=0,
                           image_token_id=config.image_token_id, stop_ids=stop_ids,
                           vit_tokens=vit_tokens)


def _wrap(model):
    """DDP, as the trainer hands models to a stage."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    return DistributedDataParallel(model.config, DistributedDataParallelConfig(), model)


def single_world(rank, world_size, dirs, eval_dir):
    from megatron_finevit.testing.finevit_vl_parity import build_model, perturb_norms
    from megatron_finevit.testing.gpt_parity import save_checkpoint
    from megatron_finevit.training.stages.align_eval import evaluate_align

    config = _gen_config()
    model = build_model(config, Layout())
    perturb_norms(model)
    save_checkpoint(model, dirs["gen"])
    model = _wrap(model)
    requests = _requests(config)
    encoder_calls = []
    hook = model.module.encoder.register_forward_hook(lambda *_: encoder_calls.append(1))
    free = _generate(model, config, requests)
    calls_one_pack = len(encoder_calls)
    # a stop id first chosen after some tokens of request 0 (ends others too where chosen)
    at = next(i for i, token in enumerate(free[0]) if token != free[0][0])
    stop = free[0][at]
    out = {"free": free, "stop": stop, "stop_at": at,
           "stopped": _generate(model, config, requests, stop_ids=(stop,)),
           "one_each": _generate(model, config, requests, seq_length=24),
           "vit_split": _generate(model, config, requests, vit_tokens=32)}
    hook.remove()
    # one pack, then 1 + 3 + 3 + 2 packs, each decoding MAX_NEW rounds (or until stopped)
    out["encoder_calls"] = [calls_one_pack, len(encoder_calls)]
    try:
        _generate(model, config, requests, seq_length=19)
    except ValueError as exc:
        out["too_long"] = str(exc)

    eval_config = _eval_config()
    model = build_model(eval_config, Layout())
    save_checkpoint(model, dirs["eval"])
    model = _wrap(model)
    out["eval"] = evaluate_align(_stage(eval_config), [model], eval_dir)
    out["eval_limited"] = evaluate_align(_stage(eval_config), [model], eval_dir, max_images=3)
    return out


def layouts_world(rank, world_size, dirs, eval_dir, stop):
    from megatron_finevit.testing.finevit_vl_parity import build_model
    from megatron_finevit.testing.gpt_parity import load_checkpoint
    from megatron_finevit.training.stages.align_eval import evaluate_align

    config, out = _gen_config(), {}
    requests = _requests(config)
    for layout in GEN_LAYOUTS:
        model = build_model(config, layout, perform_initialization=False)
        load_checkpoint(model, dirs["gen"])
        model = _wrap(model)
        out[layout.label] = {"free": _generate(model, config, requests),
                             "stopped": _generate(model, config, requests, stop_ids=(stop,))}
        if layout.sp:
            try:
                _generate(model, config, requests, seq_length=SEQ_LENGTH - 1)
            except ValueError as exc:
                out["sp_refusal"] = str(exc)
    eval_config = _eval_config()
    for layout in EVAL_LAYOUTS:
        model = build_model(eval_config, layout, perform_initialization=False)
        load_checkpoint(model, dirs["eval"])
        out[f"eval_{layout.label}"] = evaluate_align(_stage(eval_config), [_wrap(model)],
                                                     eval_dir)
    return out


@pytest.fixture(scope="module")
def worlds(tmp_path_factory):
    from megatron_finevit.data.index import build_index
    from megatron_finevit.data.synthetic import make_synthetic_shards
    from megatron_finevit.testing.corrupt_shards import truncate_image_bodies

    root = tmp_path_factory.mktemp("generation")
    eval_dir = root / "eval"
    make_synthetic_shards(eval_dir, EVAL_IMAGES, seed=1, samples_per_shard=8, progress=False)
    build_index(eval_dir, progress=False)
    truncate_image_bodies(eval_dir, [BROKEN])
    dirs = {name: str(root / name) for name in ("gen", "eval")}
    (single,) = run_world(single_world, 1, args=(dirs, str(eval_dir)))
    ranks = run_world(layouts_world, 2, args=(dirs, str(eval_dir), single["stop"]))
    return dict(single=single, ranks=ranks, dirs=dirs, eval_dir=eval_dir)


def _question_counts(eval_dir, images: int) -> dict[str, int]:
    """Questions per metric the first ``images`` samples allow, the corrupt one left out: one
    per image with a region whose caption is unique (grounding), with a region, with OCR."""
    from collections import Counter

    from megatron_finevit.data.shards import iter_shard, list_shards

    metas = [(key, meta) for path in list_shards(eval_dir) for key, _, meta in iter_shard(path)]
    counts = dict.fromkeys(("grounding", "region_caption", "ocr"), 0)
    for key, meta in metas[:images]:
        if key == BROKEN:
            continue
        captions = Counter(r["caption"].strip() for r in meta["regions"] if r["caption"].strip())
        counts["grounding"] += any(n == 1 for n in captions.values())
        counts["region_caption"] += bool(captions)
        counts["ocr"] += any(o["text"].strip() for o in meta["ocr"])
    return counts


def _hf_generate(hf_dir, requests, stop):
    """transformers' greedy ids per request (one request at a time), without the stop id."""
    from transformers import GenerationConfig

    from megatron_finevit.hf.modeling_finevit_vl import FineViTVLForConditionalGeneration
    from megatron_finevit.models.vit import pack_images

    model = FineViTVLForConditionalGeneration.from_pretrained(hf_dir).eval()
    generation = GenerationConfig(do_sample=False, max_new_tokens=MAX_NEW, eos_token_id=stop,
                                  pad_token_id=0, suppress_tokens=[model.config.image_token_id])
    outputs = []
    for request in requests:
        packed = pack_images([request.image])
        grid = torch.cat([torch.ones(1, 1, dtype=torch.long), packed.grids], dim=1)
        prompt = torch.tensor([list(request.prompt)])
        with torch.no_grad():
            ids = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt),
                                 pixel_values=packed.patches, image_grid_thw=grid,
                                 generation_config=generation)[0, prompt.shape[1]:].tolist()
        outputs.append(ids[:-1] if stop is not None and ids and ids[-1] == stop else ids)
    return outputs


def test_greedy_generation_equals_transformers(worlds, tmp_path):
    from megatron_finevit.convert.pipeline import megatron_to_hf

    config, single = _gen_config(), worlds["single"]
    megatron_to_hf("finevit-vl", worlds["dirs"]["gen"], str(tmp_path / "hf"), config=config,
                   progress=False)
    requests = _requests(config)
    assert _hf_generate(tmp_path / "hf", requests, None) == single["free"]
    assert [len(ids) for ids in single["free"]] == [MAX_NEW] * len(requests)
    stopped = _hf_generate(tmp_path / "hf", requests, single["stop"])
    assert stopped == single["stopped"]
    assert single["stopped"][0] == single["free"][0][:single["stop_at"]]  # stop id left out


def test_several_packs_equal_one():
    from megatron_finevit.evaluation.generation import plan_packs

    requests = _requests(_gen_config())
    assert plan_packs(requests, MAX_NEW, SEQ_LENGTH) == [[0, 1, 2]]
    assert plan_packs(requests, MAX_NEW, 24) == [[0], [1], [2]]
    assert plan_packs(requests, MAX_NEW, SEQ_LENGTH, vit_tokens=32) == [[0, 1], [2]]
    with pytest.raises(ValueError, match="request 0 .* does not fit a pack of 19 tokens"):
        plan_packs(requests, MAX_NEW, 19)


def test_several_packs_generate_the_same_ids(worlds):
    single = worlds["single"]
    assert single["one_each"] == single["free"]
    assert single["vit_split"] == single["free"]
    assert "does not fit a pack of 19 tokens" in single["too_long"]


def test_generation_encodes_each_pack_once(worlds):
    """The images are encoded in a pack's first round only, not in each of its MAX_NEW rounds
    (the ids above equal transformers' all the same)."""
    assert worlds["single"]["encoder_calls"] == [1, 1 + 1 + 3 + 2]


@pytest.mark.parametrize("layout", GEN_LAYOUTS, ids=lambda layout: layout.label)
def test_generation_at_any_layout_equals_single_rank(worlds, layout):
    for rank in worlds["ranks"]:  # every rank of the model-parallel group has the ids
        assert rank[layout.label]["free"] == worlds["single"]["free"]
        assert rank[layout.label]["stopped"] == worlds["single"]["stopped"]
    assert "must be a multiple of tensor_parallel=2" in worlds["ranks"][0]["sp_refusal"]


TEXT_KEYS = ("em", "f1", "baseline_em", "baseline_f1")


def test_evaluate_align_reports_every_metric(worlds):
    results = worlds["single"]["eval"]
    expected = ({f"grounding_{k}" for k in ("acc", "baseline", "parse_failures", "n")}
                | {f"{p}_{k}" for p in ("region_caption", "ocr") for k in TEXT_KEYS + ("n",)}
                | {"eval_skipped"})
    assert set(results) == expected
    assert results["eval_skipped"] == 1  # the corrupt image
    for images, got in ((EVAL_IMAGES, results), (3, worlds["single"]["eval_limited"])):
        counts = _question_counts(worlds["eval_dir"], images)
        assert counts["grounding"] > 0 and counts["ocr"] > 0
        assert {p: got[f"{p}_n"] for p in counts} == counts
    for key, value in results.items():
        if not key.endswith(("_n", "_skipped", "_failures")):
            assert 0.0 <= value <= 1.0, key
    assert 0 <= results["grounding_parse_failures"] <= results["grounding_n"]
    assert results["region_caption_baseline_em"] > 0  # the most frequent caption is someone's


@pytest.mark.parametrize("layout", EVAL_LAYOUTS, ids=["dp2", "pp2"])
def test_evaluate_align_at_any_layout_equals_single_rank(worlds, layout):
    for rank in worlds["ranks"]:
        assert rank[f"eval_{layout.label}"] == worlds["single"]["eval"]
