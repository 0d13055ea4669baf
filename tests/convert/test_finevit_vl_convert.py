"""FineViT-VL conversion: a random HF ``FineViTVLForConditionalGeneration`` (``save_pretrained``)
-> megatron -> HF must be bit-exact, and the megatron ``FineViTVLModel`` loaded from the converted
checkpoint must give the HF model's logits on an image + prompt."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from megatron_finevit.config.vit import tiny_vit
from megatron_finevit.convert.finevit import vit_hf_config
from megatron_finevit.hf.configuration_finevit import FineViTVLHFConfig
from megatron_finevit.hf.modeling_finevit_vl import FineViTVLForConditionalGeneration
from megatron_finevit.testing.finevit_vl_parity import (
    IMAGE_TOKEN_ID,
    convert_world,
    hf_image_inputs,
    parity_prompt,
)
from megatron_finevit.testing.multirank import run_world

TEXT = dict(model_type="qwen3", vocab_size=64, hidden_size=32, intermediate_size=48,
            num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
            rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=False,
            max_position_embeddings=128)


def _load_dir(path) -> dict:
    tensors = {}
    for f in sorted(path.glob("*.safetensors")):
        tensors.update(load_file(f))
    return tensors


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("finevit_vl")
    torch.manual_seed(0)
    vision = {k: v for k, v in vit_hf_config(tiny_vit(num_layers=2)).items()}
    config = FineViTVLHFConfig(vision_config=vision, text_config=TEXT,
                               image_token_id=IMAGE_TOKEN_ID)
    model = FineViTVLForConditionalGeneration(config).eval()
    with torch.no_grad():  # norms at 1 would hide a swapped or dropped norm weight
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(root / "hf")
    (result,) = run_world(convert_world, 1,
                          args=(str(root / "hf"), str(root / "mcore"), str(root / "back")))
    return model, root, result


def test_round_trip_is_bit_exact(converted):
    model, root, _ = converted
    original, back = _load_dir(root / "hf"), _load_dir(root / "back")
    assert set(back) == set(original)
    assert any(k.startswith("visual.layers.1.") for k in back)
    assert any(k.startswith("language_model.model.layers.2.") for k in back)
    for name, tensor in original.items():
        assert torch.equal(back[name], tensor), name
    reloaded = FineViTVLForConditionalGeneration.from_pretrained(root / "back")
    assert reloaded.config.image_token_id == IMAGE_TOKEN_ID
    assert reloaded.config.text_config.num_hidden_layers == TEXT["num_hidden_layers"]


def test_megatron_logits_match_hf(converted):
    model, _, result = converted
    pixel_values, grid_thw = hf_image_inputs()
    with torch.no_grad():
        expected = model(input_ids=parity_prompt(), pixel_values=pixel_values,
                         image_grid_thw=grid_thw).logits
    assert result["logits"].shape == expected.shape
    torch.testing.assert_close(result["logits"], expected, atol=1e-4, rtol=1e-4)
