"""The region-QA loader on FineCap-mini shards: batches equal an independent per-sample render,
budgets hold, resume is exact across an epoch boundary, DP ranks are disjoint, skips are
counted against brute force."""

import json
import re

import pytest

from megatron_finevit.data.decode_pil import decode_pil, open_image
from megatron_finevit.data.index import build_index
from megatron_finevit.data.resize import ResizePolicy
from megatron_finevit.data.shards import iter_shard, list_shards
from megatron_finevit.data.synthetic import make_synthetic_shards
from megatron_finevit.data.tasks.boxes import BoxCodec
from megatron_finevit.data.tasks.chat import IGNORE_INDEX
from megatron_finevit.data.tasks.multimodal import image_llm_tokens
from megatron_finevit.data.tasks.region_qa import draw_turns
from megatron_finevit.data.tasks.region_qa_loader import RegionQAConfig, RegionQALoader
from megatron_finevit.data.tokenizers import QwenTokenizer

NUM_SAMPLES = 40
POLICY = ResizePolicy(max_pixels=112 * 112)  # 16..64 patches: fast decode, several per pack
CONFIG = RegionQAConfig(llm_tokens=384, vit_tokens=192, max_text_tokens=256, max_turns=4,
                        policy=POLICY, seed=11, buffer_size=12)


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("region_qa")
    make_synthetic_shards(path, NUM_SAMPLES, seed=4, samples_per_shard=16, progress=False)
    build_index(path, progress=False)
    return path


@pytest.fixture(scope="module")
def tokenizer():
    return QwenTokenizer.from_tiktoken()


@pytest.fixture(scope="module")
def scanned(shard_dir):
    """key -> (image bytes, meta) by a sequential scan of the shards (the oracle's input)."""
    return {key: (image, meta) for shard in list_shards(shard_dir)
            for key, image, meta in iter_shard(shard)}


def make_loader(shard_dir, tokenizer, config=CONFIG, **kw):
    return RegionQALoader(shard_dir, config, tokenizer, use_draft=True, **kw)


def signature(batch):
    return (batch.input_ids.tolist(), batch.labels.tolist(), batch.position_ids.tolist(),
            batch.cu_seqlens.tolist(), batch.label_task.tolist(), batch.images.grids.tolist(),
            batch.images.patches.sum().item(), batch.keys, batch.task_kinds, batch.skipped)


def segments(batch):
    bounds = batch.cu_seqlens.tolist()
    return [slice(a, b) for a, b in zip(bounds, bounds[1:])]


def test_batches_equal_an_independent_render(shard_dir, tokenizer, scanned):
    """Each sample's segment is what rendering it alone from a sequential scan gives; budgets
    hold; the tail is one padding-only segment."""
    loader = make_loader(shard_dir, tokenizer)
    template, codec = loader.template, BoxCodec()
    row = {str(k): i for i, k in enumerate(loader.index.key)}
    batches = list(loader.epoch())  # epoch 0: turns drawn with step 0
    assert sum(b.num_samples for b in batches) == NUM_SAMPLES
    for batch in batches:
        assert batch.input_ids.shape == (CONFIG.llm_tokens,)
        assert batch.images.patches.shape[0] == sum(batch.images.image_lengths) <= CONFIG.vit_tokens
        segs = segments(batch)
        for key, seg, kinds in zip(batch.keys, segs, batch.task_kinds):
            image_bytes, meta = scanned[key]
            image = decode_pil(image_bytes, POLICY, use_draft=True)
            turns = draw_turns(meta, original_hw=(meta["height"], meta["width"]),
                               resized_hw=tuple(image.shape[1:]), codec=codec,
                               mixture=CONFIG.mixture, seed=CONFIG.seed, key=key, step=0,
                               max_turns=CONFIG.max_turns)
            allowance = int(loader.sizes[row[key], 1])
            alone = template.encode(turns, image_llm_tokens(image), max_tokens=allowance)
            assert batch.input_ids[seg].tolist() == alone.ids.tolist()
            assert batch.labels[seg].tolist() == alone.labels().tolist()
            assert kinds == [t.kind for t in alone.turns] and seg.stop - seg.start <= allowance
        if len(segs) > batch.num_samples:  # the padding tail
            assert len(segs) == batch.num_samples + 1
            pad = segs[-1]
            assert (batch.input_ids[pad] == template.pad_id).all()
            assert (batch.labels[pad] == IGNORE_INDEX).all()
            assert batch.position_ids[pad].tolist() == list(range(pad.stop - pad.start))
        assert batch.cu_seqlens[-1] == CONFIG.llm_tokens
    real = sum(b.cu_seqlens[b.num_samples].item() for b in batches)
    print(f"LLM tokens in samples: {real / (len(batches) * CONFIG.llm_tokens):.1%} of "
          f"{len(batches)} packs; allowance fill {loader.sampler.stats.efficiency_per_budget}")


def test_resume_is_exact_across_an_epoch_boundary(shard_dir, tokenizer):
    reference = make_loader(shard_dir, tokenizer)
    per_epoch = len(list(make_loader(shard_dir, tokenizer).epoch()))
    total = per_epoch + 3  # into epoch 1, whose turns are drawn afresh
    stream = [signature(next(reference)) for _ in range(total)]
    assert stream[:3] != stream[per_epoch:per_epoch + 3]
    for stop in (2, per_epoch):
        first = make_loader(shard_dir, tokenizer)
        assert [signature(next(first)) for _ in range(stop)] == stream[:stop]
        state = json.loads(json.dumps(first.state_dict()))  # plain data, no pickle
        resumed = make_loader(shard_dir, tokenizer)
        resumed.load_state_dict(state)
        assert [signature(next(resumed)) for _ in range(total - stop)] == stream[stop:]


def test_dp_ranks_are_disjoint_and_a_sample_does_not_depend_on_its_pack(shard_dir, tokenizer):
    single = {key: batch.input_ids[seg].tolist() for batch in
              make_loader(shard_dir, tokenizer).epoch()
              for key, seg in zip(batch.keys, segments(batch))}
    shares = []
    for rank in range(2):
        share = {}
        for batch in make_loader(shard_dir, tokenizer, dp_rank=rank, dp_size=2).epoch():
            for key, seg in zip(batch.keys, segments(batch)):
                share[key] = batch.input_ids[seg].tolist()
        shares.append(share)
    assert not set(shares[0]) & set(shares[1])
    assert set(shares[0]) | set(shares[1]) == set(single)
    assert abs(len(shares[0]) - len(shares[1])) <= 1
    for share in shares:
        assert all(tokens == single[key] for key, tokens in share.items())


def test_oversize_and_rejected_samples_are_skipped_and_counted(shard_dir, tokenizer, scanned):
    """Brute force: decode every image / read every header, count what cannot be packed."""
    policy = ResizePolicy(max_pixels=112 * 112, max_aspect_ratio=2.0)
    config = RegionQAConfig(**{**CONFIG.__dict__, "policy": policy, "vit_tokens": 48})
    rejected, oversize, usable = set(), set(), set()
    for key, (image_bytes, _) in scanned.items():
        _, height, width = open_image(image_bytes)
        if max(height, width) > 2.0 * min(height, width):
            rejected.add(key)
        elif decode_pil(image_bytes, policy).shape[1:].numel() // 196 > 48:
            oversize.add(key)
        else:
            usable.add(key)
    assert rejected and oversize and usable  # the fixture exercises all three
    loader = make_loader(shard_dir, tokenizer, config)
    keys = {key for batch in loader.epoch() for key in batch.keys}
    assert keys == usable
    assert loader.skipped == {"resize_rejected": len(rejected), "oversize": len(oversize),
                              "no_task": 0, "no_turn_fits": 0}


def test_samples_whose_turns_cannot_fit_are_counted(shard_dir, tokenizer):
    config = RegionQAConfig(**{**CONFIG.__dict__, "max_text_tokens": 12})
    loader = make_loader(shard_dir, tokenizer, config)
    assert list(loader.epoch()) == []
    assert loader.skipped["no_turn_fits"] == NUM_SAMPLES
    resumed = make_loader(shard_dir, tokenizer, config)
    resumed.load_state_dict(json.loads(json.dumps(loader.state_dict())))
    assert resumed.skipped == loader.skipped
    other_sizes = make_loader(shard_dir, tokenizer,
                              RegionQAConfig(**{**CONFIG.__dict__, "max_text_tokens": 13}))
    with pytest.raises(ValueError, match="pack sizes differ"):
        other_sizes.load_state_dict(loader.state_dict())


TURN_TEXT = re.compile(r"<\|im_start\|>user\n(?:<\|vision_start\|>(?:<\|image_pad\|>)+"
                       r"<\|vision_end\|>)?(.*?)<\|im_end\|>\n<\|im_start\|>assistant\n(.*?)"
                       r"<\|im_end\|>\n", re.S)
BOX_IN_TEXT = re.compile(r"\[[0-9, ]+\]")


@pytest.mark.parametrize("coords", ["relative", "absolute"])
def test_boxes_in_the_text_point_at_the_annotations(shard_dir, tokenizer, scanned, coords):
    """Read the rendered conversations back as text: every box (parsed with the codec) lies
    within half a unit of its annotation's shard box scaled to the resized image."""
    config = RegionQAConfig(**{**CONFIG.__dict__, "box_coords": coords})
    loader = make_loader(shard_dir, tokenizer, config)
    codec, checked = BoxCodec(coords), 0
    for batch in loader.epoch():
        for key, seg, kinds, grid in zip(batch.keys, segments(batch), batch.task_kinds,
                                         batch.images.grids.tolist()):
            meta = scanned[key][1]
            resized_hw = (grid[0] * 14, grid[1] * 14)
            turns = TURN_TEXT.findall(tokenizer.decode(batch.input_ids[seg].tolist()))
            assert len(turns) == len(kinds)
            for kind, (question, answer) in zip(kinds, turns):
                if kind == "global_caption":
                    assert answer == meta["caption"]
                    continue
                field, text_key = ("ocr", "text") if "ocr" in kind else ("regions", "caption")
                if kind.startswith("bbox"):
                    box, text = BOX_IN_TEXT.search(question).group(), answer
                else:
                    box, text = answer, max((e[text_key] for e in meta[field]
                                             if e[text_key] in question), key=len)
                parsed = codec.to_pixels(codec.parse(box, resized_hw), resized_hw)
                unit = [r / s for r, s in zip(resized_hw[::-1], codec.scale(resized_hw))]
                scale = [r / o for r, o in zip(resized_hw, (meta["height"], meta["width"]))]
                assert any(all(abs(p - v * scale[1 - i % 2]) <= unit[i % 2] / 2 + 1e-9
                               for i, (p, v) in enumerate(zip(parsed, e["box"])))
                           for e in meta[field] if e[text_key] == text), (key, kind, box)
                checked += 1
    assert checked > 40
