"""FineViT-VL conversion against the transformers export ``FineViTVLForConditionalGeneration``
(the external oracle), on tiny random models, one image and a prompt holding its placeholders:

- HF -> megatron -> HF is bit-exact;
- HF -> megatron, loaded at TP1, TP2, TP2 + SP and PP2: logits equal HF's (fp32, <= 1e-4);
- megatron (random init at TP2 + SP and at PP2 with a tied embedding, saved as a trainer saves)
  -> HF: transformers' logits on the export equal megatron's.
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from megatron_finevit.config.llm import qwen3_1p7b, qwen3_8b
from megatron_finevit.config.vit import finevit_0p86b, tiny_vit
from megatron_finevit.config.vlm import FineViTVLConfig, vl_preset
from megatron_finevit.convert.finevit import vit_hf_config
from megatron_finevit.convert.pipeline import megatron_to_hf
from megatron_finevit.hf.configuration_finevit import FineViTVLHFConfig
from megatron_finevit.hf.modeling_finevit_vl import FineViTVLForConditionalGeneration
from megatron_finevit.testing.finevit_vl_parity import (
    IMAGE_TOKEN_ID,
    convert_world,
    hf_image_inputs,
    layouts_world,
    parity_prompt,
    tiny_vl_config,
)
from megatron_finevit.testing.multirank import run_world
from megatron_finevit.testing.multirank import Layout

ORACLE_TOL = 1e-4
TEXT = dict(model_type="qwen3", vocab_size=64, hidden_size=32, intermediate_size=48,
            num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
            rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=False,
            max_position_embeddings=128)
LOADED_LAYOUTS = [Layout(tp=2), Layout(tp=2, sp=True), Layout(pp=2)]
# The export case built in megatron: the same shapes with a tied embedding.
EXPORT_CONFIG = tiny_vl_config()
EXPORT_LAYOUTS = {"tp2_sp": Layout(tp=2, sp=True), "pp2_tied": Layout(pp=2)}


def _load_dir(path) -> dict:
    tensors = {}
    for f in sorted(path.glob("*.safetensors")):
        tensors.update(load_file(f))
    return tensors


def _hf_logits(model) -> torch.Tensor:
    pixel_values, grid_thw = hf_image_inputs()
    with torch.no_grad():
        return model(input_ids=parity_prompt(), pixel_values=pixel_values,
                     image_grid_thw=grid_thw).logits


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("finevit_vl")
    torch.manual_seed(0)
    config = FineViTVLHFConfig(vision_config=vit_hf_config(tiny_vit(num_layers=2)),
                               text_config=TEXT, image_token_id=IMAGE_TOKEN_ID)
    model = FineViTVLForConditionalGeneration(config).eval()
    with torch.no_grad():  # norms at 1 would hide a swapped or dropped norm weight
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(root / "hf")
    (single,) = run_world(convert_world, 1,
                          args=(str(root / "hf"), str(root / "mcore"), str(root / "back")))
    export_dirs = {name: str(root / f"trained_{name}") for name in EXPORT_LAYOUTS}
    ranks = run_world(layouts_world, 2, args=(str(root / "mcore"), LOADED_LAYOUTS, EXPORT_CONFIG,
                                              EXPORT_LAYOUTS, export_dirs))
    return dict(model=model, root=root, single=single, ranks=ranks, export_dirs=export_dirs)


def test_round_trip_is_bit_exact(converted):
    root = converted["root"]
    original, back = _load_dir(root / "hf"), _load_dir(root / "back")
    assert set(back) == set(original)
    assert any(k.startswith("visual.layers.1.") for k in back)
    assert any(k.startswith("language_model.model.layers.3.") for k in back)
    for name, tensor in original.items():
        assert torch.equal(back[name], tensor), name
    reloaded = FineViTVLForConditionalGeneration.from_pretrained(root / "back")
    assert reloaded.config.image_token_id == IMAGE_TOKEN_ID
    assert reloaded.config.text_config.num_hidden_layers == TEXT["num_hidden_layers"]


def test_converted_checkpoint_at_tp1_matches_hf(converted):
    expected = _hf_logits(converted["model"])
    logits = converted["single"]["logits"]
    assert logits.shape == expected.shape
    torch.testing.assert_close(logits, expected, atol=ORACLE_TOL, rtol=ORACLE_TOL)


@pytest.mark.parametrize("layout", LOADED_LAYOUTS, ids=lambda layout: layout.label)
def test_converted_checkpoint_loads_at_any_layout(converted, layout):
    expected = _hf_logits(converted["model"])
    # TP ranks all hold the gathered logits; under PP only the last stage (rank 1) does.
    holders = [r["loaded"][layout.label] for r in converted["ranks"]
               if r["loaded"][layout.label] is not None]
    assert len(holders) == (1 if layout.pp > 1 else 2)
    for logits in holders:
        torch.testing.assert_close(logits, expected, atol=ORACLE_TOL, rtol=ORACLE_TOL)


@pytest.mark.parametrize("name", sorted(EXPORT_LAYOUTS))
def test_megatron_checkpoint_exports_to_hf(converted, name, tmp_path, convert_tool):
    """The TP2 + SP checkpoint goes through the command line with --config (a trainer's
    checkpoint has no model_config.json), the PP2 one through the Python API."""
    megatron_logits = [r["exported"][name] for r in converted["ranks"]
                       if r["exported"][name] is not None][0]
    out = tmp_path / "hf"
    if name == "tp2_sp":
        config_file = tmp_path / "vl.json"
        config_file.write_text(json.dumps(EXPORT_CONFIG.to_dict()))
        assert convert_tool("mcore-to-hf", "--model", "finevit-vl", "--config", str(config_file),
                            "--mcore-dir", converted["export_dirs"][name], "--hf-dir", str(out),
                            "--no-progress") == 0
    else:
        megatron_to_hf("finevit-vl", converted["export_dirs"][name], str(out),
                       config=EXPORT_CONFIG, progress=False)
    model = FineViTVLForConditionalGeneration.from_pretrained(out).eval()
    assert model.config.tie_word_embeddings == EXPORT_CONFIG.llm.tie_embeddings
    torch.testing.assert_close(_hf_logits(model), megatron_logits, atol=ORACLE_TOL,
                               rtol=ORACLE_TOL)


def test_presets_are_the_paper_encoder_with_the_ablation_llms():
    for name, llm in (("finevit_vl_1p7b", qwen3_1p7b()), ("finevit_vl_8b", qwen3_8b())):
        config = vl_preset(name)
        assert config.vit == finevit_0p86b() and config.llm == llm
        assert config.image_token_id == 151655  # <|image_pad|>
        config.validate(tensor_parallel=8, pipeline_parallel=4)
        assert FineViTVLConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(ValueError, match="unknown FineViT-VL preset"):
        vl_preset("finevit_vl_70b")


def test_layout_errors_name_the_tower():
    config = replace(EXPORT_CONFIG, llm=replace(EXPORT_CONFIG.llm, num_layers=3))
    with pytest.raises(ValueError, match="language model: .*pipeline_parallel=2 does not divide "
                                         "num_layers=3"):
        config.validate(pipeline_parallel=2)
    with pytest.raises(ValueError, match="encoder: .*tensor_parallel=3 does not divide"):
        EXPORT_CONFIG.validate(tensor_parallel=3)
    # an uneven split: 4 of Qwen3-1.7B's 28 layers on the encoder's stage, 12 + 12 on the others
    uneven = replace(vl_preset("finevit_vl_1p7b"), first_stage_llm_layers=4)
    vit_tc, llm_tc = uneven.to_transformer_configs(pipeline_parallel=3)
    assert (vit_tc.pipeline_model_parallel_size, llm_tc.pipeline_model_parallel_size,
            llm_tc.num_layers_in_first_pipeline_stage) == (1, 3, 4)
    assert FineViTVLConfig.from_dict(uneven.to_dict()) == uneven
    with pytest.raises(ValueError, match="first_stage_llm_layers=5 must be >= 1 and leave the "
                                         "other 2 stages an equal share"):
        replace(uneven, first_stage_llm_layers=5).validate(pipeline_parallel=3)
