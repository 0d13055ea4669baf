"""Stage III (``align``) through the trainer.

* Initialisation: the encoder from a Stage II run's checkpoint, the LLM from a converted HF
  Qwen3, checked tensor by tensor against those files; a mismatched piece is one clear error.
* Layouts: from the same initial weights, three steps at TP2 + SP, PP2 (uneven LM split), CP2
  and DP2 with the distributed optimiser give the single-rank losses (DP2 against one rank
  accumulating both ranks' packs; CP2 against one rank on the same packs, every sample padded
  to 2·cp = 4 tokens), on data with a corrupt image in the first pack (under PP every stage
  skips it alike).
* Freeze switches: the encoder frozen until step 2 (its weights do not move, then do), the
  projector at 5× the learning rate; a run stopped before, at and after the switch and resumed
  gives the uninterrupted run's losses bit for bit.
"""

from __future__ import annotations

import dataclasses
import shutil

import pytest
import torch

from megatron_finevit.testing.multirank import run_world
from megatron_finevit.testing.stage_assets import (
    Interleaved,
    make_align_assets,
    make_stage_assets,
    tiny_align_run,
    tiny_run,
)

STEPS = 3
LAYOUTS = {"tp2_sp": dict(tp=2, sp=True), "pp2": dict(pp=2, first_stage_llm_layers=1),
           "cp2": dict(cp=2), "dp2": dict()}
REFERENCES = {"dp2": "dp_oracle", "cp2": "cp_oracle"}  # single-rank runs (default: "single")
SWITCH = 2  # the encoder starts training here
RESUME_STEPS = 4
POLICIES = {"vit_policy": {"train_from": SWITCH}, "projector_policy": {"lr_mult": 5.0}}
GENERATION_QUESTION = "Where is a red circle? Answer with a bounding box."
GENERATION_TOKENS = 12


def _config(assets, steps, init_dir=None, layout=None, **stage_config):
    layout = dict(layout or {})
    first = layout.pop("first_stage_llm_layers", None)
    if first is not None:
        stage_config["first_stage_llm_layers"] = first
    cp = layout.pop("cp", 1)
    cfg = tiny_align_run(assets, steps, **layout, **stage_config)
    cfg.parallel.context_parallel = cp
    cfg.checkpoint.load_dir = init_dir
    return cfg


def _losses(trainer, steps):
    return [(trainer.train_step() or {}).get("loss") for _ in range(steps)]


def _encoder_weight(trainer):
    from megatron_finevit.training.trainer import _unwrap

    module = _unwrap(trainer.model[0])
    return module.encoder.decoder.layers[0].mlp.linear_fc1.weight.detach().clone()


def single_rank_world(rank, world_size, assets, stage_assets, dirs):
    from megatron_finevit.convert.mcore_io import MegatronCheckpointReader
    from megatron_finevit.data.tasks.region_qa_loader import RegionQALoader
    from megatron_finevit.testing.corrupt_shards import truncate_image_bodies
    from megatron_finevit.training.checkpoint_files import CheckpointError
    from megatron_finevit.training.checkpointing import latest_checkpoint
    from megatron_finevit.training.stage import get_stage
    from megatron_finevit.training.trainer import Trainer

    out = {}
    # a corrupt image in the first pack every layout draws
    probe = get_stage("align")(_config(assets, STEPS))
    first_pack = next(iter(probe._loader(assets["train"], 0, 1).sampler))
    broken = str(probe._loader(assets["train"], 0, 1).index.key[first_pack[0]])
    truncate_image_bodies(assets["train"], [broken])

    # Stage II run (0 steps: its initial weights) -> Stage III initial weights
    stage2 = tiny_run("contrastive", stage_assets, steps=0)
    stage2.checkpoint.dir = dirs["stage2"]
    stage2.parallel.distributed_optimizer = False
    Trainer(stage2).train()
    init = _config(assets, 0, vit_init_dir=dirs["stage2"], llm_init_dir=assets["llm_init"])
    init.checkpoint.dir = dirs["init"]
    init.parallel.distributed_optimizer = False  # its state cannot be saved before a step
    Trainer(init).train()
    saved = MegatronCheckpointReader(latest_checkpoint(dirs["init"]))
    for source, prefix in ((MegatronCheckpointReader(latest_checkpoint(dirs["stage2"])),
                            "encoder."), (MegatronCheckpointReader(assets["llm_init"]), "")):
        keys = [k for k in source.keys() if k.startswith(prefix)]
        ours = [("llm." if not prefix else "") + k for k in keys]
        assert set(ours) <= set(saved.keys()), sorted(set(ours) - set(saved.keys()))[:3]
        a = source.load([(k, None) for k in keys])
        b = saved.load([(k, None) for k in ours])
        out[f"init_equal_{prefix or 'llm'}"] = all(
            torch.equal(a[(k, None)], b[(o, None)]) for k, o in zip(keys, ours))
        out[f"init_tensors_{prefix or 'llm'}"] = len(keys)

    # the initial Stage III checkpoint (a trainer's) exported to transformers; megatron's greedy
    # answer to a held-out question, for the export to reproduce (test below)
    from megatron_finevit.convert.pipeline import megatron_to_hf
    from megatron_finevit.data.decode_pil import decode_pil
    from megatron_finevit.data.index import load_index
    from megatron_finevit.data.loader import SampleReader
    from megatron_finevit.data.tasks.multimodal import image_llm_tokens
    from megatron_finevit.evaluation.generation import GenerationRequest, greedy_generate

    stage = get_stage("align")(_config(assets, 0))
    megatron_to_hf("finevit-vl", str(latest_checkpoint(dirs["init"])), dirs["hf"],
                   config=stage.vl, progress=False)
    reader = SampleReader(load_index(assets["eval"]))
    image_bytes, _ = reader.read(0)
    reader.close()
    image = decode_pil(image_bytes, stage.data_config.policy, stage.norm)
    prompt = stage.template.encode_prompt(GENERATION_QUESTION, image_llm_tokens(image))
    trainer = Trainer(_config(assets, 0, dirs["init"]))
    (ids,) = greedy_generate(trainer.model, [GenerationRequest(image, prompt)],
                             max_new_tokens=GENERATION_TOKENS, seq_length=256,
                             vocab_size=stage.vl.llm.vocab_size, pad_id=stage.template.pad_id,
                             image_token_id=stage.vl.image_token_id, vit_tokens=256,
                             stop_ids=[stage.template.tokenizer.token_id("<|im_end|>")])
    out["generation"] = {"image": image_bytes, "prompt": prompt, "ids": ids}

    # a mismatched piece is one clear error naming it
    for name, changes in (("llm", dict(llm_init_dir=assets["llm_init"],
                                       llm_overrides={"num_layers": 3})),
                          ("vit", dict(vit_init_dir=dirs["stage2"],
                                       vit_overrides={"num_layers": 2, "hidden_size": 96}))):
        with pytest.raises(CheckpointError) as info:
            Trainer(_config(assets, 1, **changes))
        out[f"error_{name}"] = str(info.value)

    runs = {}
    trainer = Trainer(_config(assets, STEPS, dirs["init"]))
    runs["single"] = _losses(trainer, STEPS)
    out["skipped"] = trainer.stage.loader.counter.num_skipped
    trainer = Trainer(_config(assets, STEPS, dirs["init"], global_batch=2))
    stage = trainer.stage
    trainer.data = Interleaved([stage._loader(assets["train"], r, 2) for r in range(2)])
    runs["dp_oracle"] = _losses(trainer, STEPS)
    # CP2's packs: every sample padded to 2·cp = 4 LLM tokens (the CP2 run's loader does that)
    trainer = Trainer(_config(assets, STEPS, dirs["init"]))
    stage = trainer.stage
    trainer.data = RegionQALoader(assets["train"],
                                  dataclasses.replace(stage.data_config, segment_multiple=4),
                                  stage.template.tokenizer, use_draft=True, norm=stage.norm)
    runs["cp_oracle"] = _losses(trainer, STEPS)
    out["runs"] = runs
    return out


def layouts_world(rank, world_size, assets, dirs):
    from megatron_finevit.training.trainer import Trainer

    out = {}
    for name, layout in LAYOUTS.items():
        trainer = Trainer(_config(assets, STEPS, dirs["init"], layout))
        out[name] = _losses(trainer, STEPS)

    # freeze switch at DP2: uninterrupted, then stopped before / at / after the switch
    cfg = _config(assets, RESUME_STEPS, dirs["init"], **POLICIES)
    trainer = Trainer(cfg)
    weights = [_encoder_weight(trainer)]
    losses = []
    for _ in range(RESUME_STEPS):
        losses.append(trainer.train_step()["loss"])
        weights.append(_encoder_weight(trainer))
    out["frozen_until_switch"] = [torch.equal(weights[0], w) for w in weights]
    out["uninterrupted"] = losses
    out["resumed"] = {}
    for stop in (SWITCH - 1, SWITCH, SWITCH + 1):
        cfg = _config(assets, RESUME_STEPS, dirs["init"], **POLICIES)
        cfg.checkpoint.dir = directory = f"{dirs['resume']}_{stop}"
        first = Trainer(cfg)  # stopped after `stop` steps (as a pre-emption's save does)
        head = _losses(first, stop)
        first.save()
        tail = Trainer(cfg).train()["losses"]  # resumes from that checkpoint
        out["resumed"][stop] = head + tail
        if rank == 0:
            shutil.rmtree(directory, ignore_errors=True)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("stage_align")
    assets = make_align_assets(root / "assets")
    stage_assets = make_stage_assets(root / "stage_assets", num_train=32, num_eval=8)
    dirs = {k: str(root / k) for k in ("stage2", "init", "resume", "hf")}
    (single,) = run_world(single_rank_world, 1, args=(assets, stage_assets, dirs), timeout_s=900)
    pair = run_world(layouts_world, 2, args=(assets, dirs), timeout_s=1200)
    return single, pair, dirs


def test_initialisation_reads_stage2_encoder_and_converted_llm(runs):
    single, _, _ = runs
    assert single["init_tensors_encoder."] > 5 and single["init_equal_encoder."]
    assert single["init_tensors_llm"] > 5 and single["init_equal_llm"]


def test_mismatched_initial_pieces_are_named(runs):
    single, _, _ = runs
    assert "another Qwen3 than stage_config.llm describes: num_layers 2 (run: 3)" in \
        single["error_llm"]
    assert "does not hold this run's FineViT encoder" in single["error_vit"]
    assert "other shapes" in single["error_vit"]


def test_exported_checkpoint_generates_megatrons_tokens_through_the_processor(runs):
    """A Stage III trainer checkpoint exported with mcore-to-hf loads with AutoProcessor and
    AutoModelForImageTextToText; on a held-out synthetic image the processor gives the prompt
    megatron was given, and greedy generate() gives megatron's greedy tokens."""
    import io

    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    import megatron_finevit.hf  # noqa: F401  (registers the Auto classes)

    single, _, dirs = runs
    generation = single["generation"]
    processor = AutoProcessor.from_pretrained(dirs["hf"])
    model = AutoModelForImageTextToText.from_pretrained(dirs["hf"]).eval()
    messages = [{"role": "user", "content": [{"type": "image"},
                                             {"type": "text", "text": GENERATION_QUESTION}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    image = Image.open(io.BytesIO(generation["image"]))
    # the export's processor defaults to Stage III's 1000² budget; this run trained within 112²
    inputs = processor(images=[image], text=[text], return_tensors="pt", max_pixels=112 * 112)
    assert inputs["input_ids"][0].tolist() == generation["prompt"]
    out = model.generate(**inputs, max_new_tokens=GENERATION_TOKENS, do_sample=False,
                         suppress_tokens=[model.config.image_token_id])
    hf_ids = out[0, inputs["input_ids"].shape[1]:].tolist()
    if hf_ids[-1:] == [model.generation_config.eos_token_id]:  # megatron returns no stop id
        hf_ids = hf_ids[:-1]
    assert len(generation["ids"]) > 0 and hf_ids == generation["ids"]


def test_vlmevalkit_wrapper_answers_with_megatrons_tokens(runs, tmp_path):
    """``evaluation.vlmeval.FineViTVLChat`` (VLMEvalKit's custom-model interface) on the export:
    a message built as VLMEvalKit passes it (image path, then the question) gives megatron's
    greedy tokens, and ``generate`` their text; plain strings normalise as VLMEvalKit's do."""
    from megatron_finevit.evaluation.vlmeval import FineViTVLChat, normalise_message

    single, _, dirs = runs
    generation = single["generation"]
    image = tmp_path / "held_out.jpg"
    image.write_bytes(generation["image"])
    model = FineViTVLChat(dirs["hf"], max_new_tokens=GENERATION_TOKENS, max_pixels=112 * 112)
    message = [{"type": "image", "value": str(image)},
               {"type": "text", "value": GENERATION_QUESTION}]
    assert model.answer_ids(message) == generation["ids"]
    expected = model.processor.tokenizer.decode(generation["ids"], skip_special_tokens=True)
    assert model.generate(message, dataset="RefCOCO") == expected.strip()
    assert normalise_message([str(image), GENERATION_QUESTION]) == message
    with pytest.raises(ValueError, match="needs type image|text"):
        normalise_message([{"type": "video", "value": "x.mp4"}])


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_losses_equal_single_rank(runs, name):
    single, pair, _ = runs
    reference = single["runs"][REFERENCES.get(name, "single")]
    assert single["skipped"] == 1  # the corrupt image was met and skipped
    assert len(set(reference)) == STEPS and reference[-1] < reference[0]  # it trains
    holders = [r[name] for r in pair if r[name][0] is not None]
    assert len(holders) == (1 if name == "pp2" else 2)  # under PP only the last stage reports
    for losses in holders:
        assert losses == pytest.approx(reference, rel=1e-5)


def test_frozen_encoder_does_not_move_until_its_switch(runs):
    _, pair, _ = runs
    for r in pair:
        # weights before step 1, after steps 1..4: unchanged while frozen (steps 0 and 1)
        assert r["frozen_until_switch"] == [True, True, True, False, False]


@pytest.mark.parametrize("stop", [SWITCH - 1, SWITCH, SWITCH + 1])
def test_resume_across_the_freeze_switch_is_exact(runs, stop):
    _, pair, _ = runs
    for r in pair:
        assert r["resumed"][stop] == r["uninterrupted"]


def test_config_problems_are_listed_together():
    from megatron_finevit.config.errors import ConfigError
    from megatron_finevit.training.stage import get_stage

    cfg = tiny_align_run({"train": "unused"}, 1, tp=2, sp=True,
                         vit_policy={"train_from": None}, projector_policy={"train_from": None},
                         llm_policy={"train_from": None, "lr_mult": -1.0},
                         eval_kinds=["caption_to_bbox", "global_caption"])
    cfg.stage_config["data"].update(llm_tokens=127, box_coords="polar",
                                    mixture={"caption_to_box": 1.0})
    cfg.parallel.context_parallel = 2
    with pytest.raises(ConfigError) as info:
        get_stage("align")(cfg)
    text = "\n".join(info.value.problems)
    for expected in ("data.llm_tokens=127 must be a multiple of 4 (2 x context_parallel=2",
                     "data.llm_tokens=127 must be a multiple of tensor_parallel=2",
                     "llm_policy.lr_mult=-1.0 must be >= 0",
                     "every module is frozen",
                     "eval_kinds=['caption_to_bbox', 'global_caption'] must be a non-empty subset",
                     "unknown task kinds ['caption_to_box']",
                     "box_coords"):
        assert expected in text, (expected, text)
