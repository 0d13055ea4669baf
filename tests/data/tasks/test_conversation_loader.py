"""ConversationLoader (SFT packs) against per-sample oracles: every usable conversation lands in
exactly one pack per epoch with the tokens of rendering it alone and its images decoded in
order; nothing is truncated (oversize conversations are skipped and counted); broken ones are
counted by reason; DP ranks are disjoint; resume is exact across an epoch boundary; the measured
sizes are cached and keyed by the policy."""

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from megatron_finevit.data.bad_samples import BadSampleCounter
from megatron_finevit.data.conversation_import import import_conversations
from megatron_finevit.data.decode_pil import decode_pil
from megatron_finevit.data.index import build_index
from megatron_finevit.data.resize import ResizePolicy
from megatron_finevit.data.shards import ShardWriter, iter_shard_samples, list_shards
from megatron_finevit.data.tasks.chat import IGNORE_INDEX, Qwen3ChatTemplate
from megatron_finevit.data.tasks.conversation import image_token_counts, messages_from_meta
from megatron_finevit.data.tasks.conversation_loader import (CONVERSATION_KINDS,
                                                             ConversationConfig,
                                                             ConversationLoader)
from megatron_finevit.data.tokenizers import QwenTokenizer
from megatron_finevit.models.vit.patch_embed import image_to_patches

POLICY = ResizePolicy(min_pixels=28 * 28, max_pixels=112 * 112)
CONFIG = ConversationConfig(llm_tokens=160, vit_tokens=96, policy=POLICY, seed=3,
                            buffer_size=8, min_fill=0.0)
SIZES = {"a.png": (56, 56), "b.png": (112, 56), "c.png": (56, 28), "wide.png": (560, 28)}


def llava(i, value, answer, image=None):
    record = {"id": f"c{i}", "conversations": [{"from": "human", "value": value},
                                               {"from": "gpt", "value": answer}]}
    if image is not None:
        record["image"] = image
    return record


RECORDS = [
    llava(0, "<image>\nWhat colour?", "Red.", "a.png"),
    llava(1, "Compare <image> and <image>.", "The first is taller.", ["b.png", "c.png"]),
    llava(2, "What is 2 + 3?", "5"),
    llava(3, "<image>Shape?", "<think>\nfour sides\n</think>\n\nA square.", "c.png"),
    llava(4, "Tell me a long story.", " ".join(["word"] * 200)),          # oversize (tokens)
    llava(5, "<image>What is this?", "A thin line.", "wide.png"),       # aspect 20: refused
    llava(6, "<image>\nAnd this one?", "Blue.", "b.png"),
    llava(7, "Say hi.", "Hi!"),
] + [llava(8 + i, f"<image>\nQuestion {i}?", f"Answer {i}.", "a.png") for i in range(6)]
USABLE = {f"c{i}" for i in range(len(RECORDS))} - {"c4", "c5"}


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("conversations")
    images = root / "images"
    images.mkdir()
    generator = np.random.default_rng(0)
    for name, (w, h) in SIZES.items():
        pixels = generator.integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(images / name)
    source = root / "data.jsonl"
    source.write_text("\n".join(json.dumps(r) for r in RECORDS))
    out = root / "shards"
    import_conversations(source, images, out, samples_per_shard=4, progress=False)
    # A conversation that breaks the rules (two user turns in a row), written past the importer.
    with ShardWriter(out, prefix="extra") as writer:
        writer.write_images("bad", [], {"images": [], "id": "bad", "conversation": [
            {"role": "user", "content": [{"text": "a"}]},
            {"role": "user", "content": [{"text": "b"}]}]})
    # indexed under a laxer aspect bound than the loader's: the loader refuses "wide.png" itself
    build_index(out, ResizePolicy(max_aspect_ratio=25.0), progress=False)
    return out


@pytest.fixture(scope="module")
def tokenizer():
    return QwenTokenizer.from_tiktoken()


def make_loader(shard_dir, tokenizer, config=CONFIG, **kw):
    return ConversationLoader(shard_dir, config, tokenizer, **kw)


def oracle(shard_dir, tokenizer):
    """key -> (ids, labels, patches) of each conversation rendered and decoded alone."""
    template = Qwen3ChatTemplate(tokenizer)
    out = {}
    for shard in list_shards(shard_dir):
        for key, images, meta, _ in iter_shard_samples(shard):
            if meta.get("id") not in USABLE:
                continue
            encoded = template.encode_messages(messages_from_meta(meta),
                                               image_token_counts(meta, POLICY))
            patches = [image_to_patches(decode_pil(data, POLICY))[0] for _, data in images]
            out[key] = (encoded.ids, encoded.labels(),
                        torch.cat(patches) if patches else torch.zeros(0, 588))
    return out


def unpack(batch, tokenizer):
    """key -> (ids, labels, patches) of each sample in the pack."""
    vision_start = tokenizer.token_id("<|vision_start|>")
    bounds = batch.cu_seqlens.tolist()
    image_bounds = batch.images.cu_seqlens.tolist() if batch.images is not None else [0]
    out, image = {}, 0
    for i, key in enumerate(batch.keys):
        ids = batch.input_ids[bounds[i]:bounds[i + 1]]
        shown = int((ids == vision_start).sum())  # one vision block per image
        start, end = image_bounds[image], image_bounds[image + shown]
        patches = batch.images.patches[start:end] if shown else torch.zeros(0, 588)
        out[key] = (ids, batch.labels[bounds[i]:bounds[i + 1]], patches)
        image += shown
    return out


def test_every_usable_conversation_once_per_epoch_as_rendered_alone(shard_dir, tokenizer):
    expected = oracle(shard_dir, tokenizer)
    assert len(expected) == len(USABLE)
    seen = {}
    for rank in range(2):
        for batch in make_loader(shard_dir, tokenizer, dp_rank=rank, dp_size=2).epoch():
            assert batch.input_ids.shape == (CONFIG.llm_tokens,)
            assert batch.images is None or len(batch.images.patches) <= CONFIG.vit_tokens
            assert batch.kinds == CONVERSATION_KINDS
            for key, got in unpack(batch, tokenizer).items():
                assert key not in seen, f"{key} twice (ranks must be disjoint)"
                seen[key] = got
    assert set(seen) == set(expected)
    for key, (ids, labels, patches) in expected.items():
        assert torch.equal(seen[key][0], ids), key
        assert torch.equal(seen[key][1], labels), key
        assert torch.equal(seen[key][2], patches), key


def test_skips_are_counted_and_nothing_is_truncated(shard_dir, tokenizer):
    loader = make_loader(shard_dir, tokenizer)
    batches = list(loader.epoch())
    assert loader.skipped == {"oversize": 1, "extreme_aspect_ratio": 1,
                              "roles_not_alternating": 1, "size_mismatch": 0}
    keys = [k for b in batches for k in b.keys]
    assert len(keys) == len(USABLE)
    # each sample's answer tokens are tagged with its kind (per-kind loss logs)
    kinds = set()
    for batch in batches:
        assert ((batch.labels != IGNORE_INDEX).float() == batch.loss_mask).all()
        for i in range(batch.num_samples):
            tasks = batch.label_task[batch.cu_seqlens[i]:batch.cu_seqlens[i + 1]]
            sample_kinds = {batch.kinds[t] for t in tasks[tasks >= 0].tolist()}
            assert len(sample_kinds) == 1
            kinds |= sample_kinds
    assert kinds == set(CONVERSATION_KINDS)


def test_resume_is_exact_across_an_epoch_boundary(shard_dir, tokenizer):
    reference = make_loader(shard_dir, tokenizer)
    uninterrupted = [next(reference) for _ in range(12)]  # ~3 epochs of ~4 packs
    first = make_loader(shard_dir, tokenizer)
    for _ in range(5):
        next(first)
    state = json.loads(json.dumps(first.state_dict()))  # plain data
    resumed = make_loader(shard_dir, tokenizer)
    resumed.load_state_dict(state)
    for want in uninterrupted[5:]:
        got = next(resumed)
        assert got.keys == want.keys and torch.equal(got.input_ids, want.input_ids)
    other = ConversationConfig(**{**CONFIG.__dict__, "llm_tokens": 192})
    with pytest.raises(ValueError, match="sizes differ"):
        make_loader(shard_dir, tokenizer, other).load_state_dict(state)


def test_sizes_are_cached_per_policy(shard_dir, tokenizer):
    make_loader(shard_dir, tokenizer)
    cached = sorted((shard_dir / "sft_sizes").glob("*.npz"))
    assert len(cached) == 1
    smaller = ResizePolicy(min_pixels=28 * 28, max_pixels=56 * 56)
    loader = make_loader(shard_dir, tokenizer,
                         ConversationConfig(**{**CONFIG.__dict__, "policy": smaller}))
    assert len(list((shard_dir / "sft_sizes").glob("*.npz"))) == 2
    # 112x56 -> 56x28 under max 56²: 8 patches, not 32; each policy has its own cache
    full = make_loader(shard_dir, tokenizer).sizes[:, 0]
    assert (loader.sizes[:, 0] <= full).all() and (loader.sizes[:, 0] < full).any()


def test_an_image_whose_size_disagrees_with_its_json_is_skipped(tmp_path, tokenizer):
    buffer = io.BytesIO()
    Image.new("RGB", (56, 56), "red").save(buffer, "PNG")
    meta = {"images": [{"width": 112, "height": 56}], "id": "liar", "conversation": [
        {"role": "user", "content": [{"image": 0}, {"text": "Colour?"}]},
        {"role": "assistant", "content": [{"text": "Red."}]}]}
    with ShardWriter(tmp_path) as writer:
        writer.write_images("liar", [(buffer.getvalue(), "png")], meta)
        writer.write_images("ok", [], {"images": [], "id": "ok", "conversation": [
            {"role": "user", "content": [{"text": "Hi"}]},
            {"role": "assistant", "content": [{"text": "Hello"}]}]})
    build_index(tmp_path, POLICY, progress=False)
    counter = BadSampleCounter()
    loader = make_loader(tmp_path, tokenizer, counter=counter)
    batches = list(loader.epoch())
    assert [k for b in batches for k in b.keys] == ["ok"]
    assert loader.skipped["size_mismatch"] == 1


def test_context_parallel_padding_keeps_every_conversation_whole(shard_dir, tokenizer):
    """segment_multiple=4 (CP2): every sample's segment is a multiple of 4 tokens, starting with
    its own tokens; the padding after them is unlabelled."""
    import dataclasses

    expected = oracle(shard_dir, tokenizer)
    config = dataclasses.replace(CONFIG, segment_multiple=4)
    seen = 0
    for batch in make_loader(shard_dir, tokenizer, config).epoch():
        bounds = batch.cu_seqlens.tolist()
        for i, key in enumerate(batch.keys):
            ids, labels, _ = expected[key]
            start, end = bounds[i], bounds[i + 1]
            assert (end - start) % 4 == 0 and end - start - len(ids) < 4
            assert torch.equal(batch.input_ids[start:start + len(ids)], ids)
            assert (batch.labels[start + len(ids):end] == IGNORE_INDEX).all()
            seen += 1
    assert seen == len(USABLE)
