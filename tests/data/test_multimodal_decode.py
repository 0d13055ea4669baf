"""DALI and PIL decode workers in the Stage III / SFT loaders (``MultimodalPackLoader``): for
region QA and for conversations (one image, two images, text only), ``decoder="dali"`` and PIL
with two workers give the reference's packs (PIL in the training process) — samples, tokens,
labels, layouts, skips and bad-sample counts; pixels equal with workers, within the decoder bound
with DALI — with truncated JPEG bodies among them (one in a pack, a whole pack of them; the
second image of a two-image conversation); a state saved with packs in flight resumes exactly;
``close`` stops the workers and keeps the position; ``epoch()`` draws nothing past its epoch; a
JSON size that disagrees with its image is skipped by every decoder; the stages pass and check
``data.decoder`` / ``data.num_workers``."""

import io
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from megatron_finevit.config.errors import ConfigError
from megatron_finevit.data.conversation_import import import_conversations
from megatron_finevit.data.decode_dali_packs import PACKS_AHEAD
from megatron_finevit.data.index import build_index
from megatron_finevit.data.resize import ResizePolicy
from megatron_finevit.data.shards import ShardWriter
from megatron_finevit.data.tasks.conversation_loader import ConversationConfig, ConversationLoader
from megatron_finevit.data.tasks.region_qa_loader import RegionQAConfig, RegionQALoader
from megatron_finevit.data.tokenizers import QwenTokenizer
from megatron_finevit.testing.conversations import conversation_records
from megatron_finevit.testing.corrupt_shards import (cut_image_bodies, next_pack_keys,
                                                     shards_with_broken_packs)
from megatron_finevit.testing.multirank import process_alive
from megatron_finevit.testing.stage_assets import tiny_align_run, tiny_sft_run
from megatron_finevit.training.stages.align import AlignStage
from megatron_finevit.training.stages.sft import SFTStage

pytest.importorskip("nvidia.dali")

REGION_QA = RegionQAConfig(llm_tokens=384, vit_tokens=192, max_text_tokens=256, max_turns=4,
                           policy=ResizePolicy(max_pixels=112 * 112), seed=11, buffer_size=12)
# images of 56..112 px under at most 84²: the larger ones are resized
CONVERSATIONS = ConversationConfig(llm_tokens=256, vit_tokens=160, seed=3, buffer_size=8,
                                   min_fill=0.0,
                                   policy=ResizePolicy(min_pixels=28 * 28, max_pixels=84 * 84))
STEPS, STOP = 6, 2
MAX_ABS_TOL = 0.25  # tests/data/test_decoders.py: DALI vs PIL, per pixel
MEAN_ABS_TOL = 0.01
DECODERS = {"dali": dict(decoder="dali"), "pil_workers": dict(num_workers=2)}


@pytest.fixture(scope="module")
def tokenizer():
    return QwenTokenizer.from_tiktoken()


@pytest.fixture(scope="module")
def region_qa(tmp_path_factory, tokenizer):
    """64 FineCap-mini samples; the second pack holds one truncated JPEG, every sample of the
    third is one. (loader maker, the broken keys, the shard directory)"""
    path = tmp_path_factory.mktemp("region_qa")

    def make(**kw):
        return RegionQALoader(path, REGION_QA, tokenizer, **kw)

    shards_with_broken_packs(path, lambda _, **__: make())
    packs = next_pack_keys(make(), 3)
    return make, {packs[1][0], *packs[2]}, path


@pytest.fixture(scope="module")
def conversations(tmp_path_factory, tokenizer):
    """50 conversations of every kind with JPEG images; the second image of a two-image
    conversation in the second to fourth pack has a truncated body. (loader maker, its key, the
    shard directory)"""
    root = tmp_path_factory.mktemp("conversations")
    path = _jpeg_conversation_shards(root, 50)

    def make(**kw):
        return ConversationLoader(path, CONVERSATIONS, tokenizer, **kw)

    probe = make()
    rows = {str(k): i for i, k in enumerate(probe.index.key)}
    key = next(k for pack in next_pack_keys(probe, 4)[1:] for k in pack
               if probe.index.num_images[rows[k]] == 2)
    cut_image_bodies(path, {(key, 1)})
    return make, {key}, path


def _jpeg_conversation_shards(root: Path, num: int) -> Path:
    """``testing.conversations``' records with their images saved as JPEG, imported and
    indexed."""
    records = conversation_records(num, root / "images", seed=1, text_only=5)
    for png in (root / "images").glob("*.png"):
        Image.open(png).convert("RGB").save(png.with_suffix(".jpg"), quality=90)
    for record in records:
        if "image" in record:
            names = record["image"] if isinstance(record["image"], list) else [record["image"]]
            jpegs = [name.replace(".png", ".jpg") for name in names]
            record["image"] = jpegs if isinstance(record["image"], list) else jpegs[0]
    (root / "data.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    import_conversations(root / "data.jsonl", root / "images", root / "shards",
                         samples_per_shard=16, progress=False)
    build_index(root / "shards", progress=False)
    return root / "shards"


@pytest.fixture(scope="module", params=["region_qa", "conversations"])
def data(request):
    return request.getfixturevalue(request.param)


@pytest.fixture(scope="module")
def reference(data):
    """The PIL stream decoded in the training process, and its bad-sample counts."""
    make = data[0]
    with make() as loader:
        return _take(loader, STEPS), loader.counter.totals()


def _take(loader, count: int) -> list:
    return [next(loader) for _ in range(count)]


def _assert_same(got, want, pixel_tol=None):
    """Equal packs; pixels equal, or within ``pixel_tol`` per value and ``MEAN_ABS_TOL`` on
    average."""
    worst = 0.0
    for a, b in zip(got, want, strict=True):
        assert (a.keys, a.task_kinds, a.kinds, a.max_seqlen, a.skipped) == \
            (b.keys, b.task_kinds, b.kinds, b.max_seqlen, b.skipped)
        for name in ("input_ids", "labels", "loss_mask", "position_ids", "cu_seqlens",
                     "label_task"):
            assert torch.equal(getattr(a, name), getattr(b, name)), name
        assert (a.images is None) == (b.images is None)
        if a.images is None:
            continue
        assert torch.equal(a.images.grids, b.images.grids)
        assert torch.equal(a.images.cu_seqlens, b.images.cu_seqlens)
        if pixel_tol is None:
            assert torch.equal(a.images.patches, b.images.patches)
        else:
            diff = (a.images.patches - b.images.patches).abs()
            assert diff.max() < pixel_tol
            worst = max(worst, diff.mean().item())
    assert worst < MEAN_ABS_TOL, worst


def test_reference_skips_the_broken_samples(data, reference):
    broken = data[1]
    batches, totals = reference
    assert not broken & {key for batch in batches for key in batch.keys}
    assert totals["skipped_by_reason"] == {"truncated_image": len(broken)}


@pytest.mark.parametrize("decoder", list(DECODERS))
def test_decoders_give_the_reference_packs(data, reference, decoder):
    make = data[0]
    batches, totals = reference
    with make(**DECODERS[decoder]) as loader:
        _assert_same(_take(loader, STEPS), batches, MAX_ABS_TOL if decoder == "dali" else None)
        assert loader.counter.totals() == totals
        if decoder == "dali":
            assert loader.decoder == "dali" and loader._dali.device == "cpu"
            assert loader._dali.fallbacks >= 1  # the truncated JPEGs went through PIL


@pytest.mark.parametrize("decoder", list(DECODERS))
def test_resume_with_packs_in_flight(data, decoder):
    """The state saved while the next packs decode is the consumer's: the saving loader is not
    disturbed and a fresh one continues exactly."""
    make = data[0]
    with make(**DECODERS[decoder]) as loader:
        whole = _take(loader, STEPS)
    with make(**DECODERS[decoder]) as first:
        _assert_same(_take(first, STOP), whole[:STOP])
        assert len(first._in_flight) == PACKS_AHEAD
        state = json.loads(json.dumps(first.state_dict()))  # plain data
        _assert_same(_take(first, STEPS - STOP), whole[STOP:])
    with make(**DECODERS[decoder]) as resumed:
        resumed.load_state_dict(state)
        _assert_same(_take(resumed, STEPS - STOP), whole[STOP:])


def test_close_stops_the_workers_and_keeps_the_position(data, reference):
    batches, _ = reference
    loader = data[0](num_workers=2)
    _assert_same(_take(loader, STOP), batches[:STOP])
    pids = loader._pool.pids
    assert len(pids) == 2
    loader.close()  # drops the packs in flight
    assert not any(process_alive(pid) for pid in pids)
    _assert_same(_take(loader, STEPS - STOP), batches[STOP:])  # new workers, same stream
    loader.close()


def test_epoch_is_the_same_with_packs_ahead(region_qa):
    make = region_qa[0]
    with make() as plain, make(decoder="dali") as ahead:
        want = list(plain.epoch())
        _assert_same(list(ahead.epoch()), want, MAX_ABS_TOL)
        assert not ahead._in_flight  # nothing drawn past the epoch
        _assert_same([next(ahead)], [next(plain)], MAX_ABS_TOL)


@pytest.mark.parametrize("decoder", ["pil", "dali"])
def test_a_json_size_that_disagrees_with_its_image_is_skipped(tmp_path, tokenizer, decoder):
    """The JSON says 112x56, the PNG is 56x56: PIL decodes it at 56x56; DALI, told 112x56,
    sees the header and leaves it to PIL; both skip it as size_mismatch."""
    def png(width, height):
        buffer = io.BytesIO()
        Image.new("RGB", (width, height), "red").save(buffer, "PNG")
        return buffer.getvalue()

    def meta(key, width, height):
        return {"images": [{"width": width, "height": height}], "id": key, "conversation": [
            {"role": "user", "content": [{"image": 0}, {"text": "Colour?"}]},
            {"role": "assistant", "content": [{"text": "Red."}]}]}

    with ShardWriter(tmp_path) as writer:
        writer.write_images("liar", [(png(56, 56), "png")], meta("liar", 112, 56))
        writer.write_images("honest", [(png(56, 112), "png")], meta("honest", 56, 112))
    build_index(tmp_path, progress=False)
    with ConversationLoader(tmp_path, CONVERSATIONS, tokenizer, decoder=decoder) as loader:
        assert [k for b in loader.epoch() for k in b.keys] == ["honest"]
        assert loader.skipped["size_mismatch"] == 1


def test_stages_pass_and_check_the_decoder(region_qa, conversations):
    assets = {"train": str(region_qa[2]), "sft": str(conversations[2])}
    for stage, run, data in ((AlignStage, tiny_align_run(assets, 1), "train"),
                             (SFTStage, tiny_sft_run(assets, 1, allow_random_init=True), "sft")):
        run.stage_config["data"].update(decoder="nvjpeg", num_workers=-1)
        with pytest.raises(ConfigError) as info:
            stage(run)
        assert "stage_config.data.decoder='nvjpeg' must be one of auto" in str(info.value)
        assert "stage_config.data.num_workers=-1 must be an integer >= 0" in str(info.value)
        run.stage_config["data"].update(decoder="pil", num_workers=2)
        with stage(run)._loader(assets[data], 0, 1) as loader:
            assert loader.decoder == "pil" and loader._pool.num_workers == 2
        run.stage_config["data"].pop("decoder")  # the default: auto, DALI here
        with stage(run)._loader(assets[data], 0, 1) as loader:
            assert loader.decoder == "dali" and loader._dali.num_threads == 2
