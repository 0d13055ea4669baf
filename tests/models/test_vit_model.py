"""The FineViT encoder on one rank: a pack of images gives each image's own output and gradient,
padding the pack changes nothing, the MIM mask token hides masked pixels, and the paper preset
has Table 1's shapes and 0.8598B parameters (built on the meta device)."""

import pytest

from megatron_finevit.testing.multirank import run_world
from megatron_finevit.testing.vit_parity import model_checks

TOL = 1e-5


@pytest.fixture(scope="module")
def report():
    (result,) = run_world(model_checks, 1)
    return result


def test_packed_output_equals_each_image_alone(report):
    assert report["output_scale"] > 0.1  # a real signal, not zeros
    assert report["packed_vs_alone_output"] <= TOL


def test_packed_gradient_equals_sum_of_per_image_gradients(report):
    assert report["num_grads"] >= 20  # patch embedding, every layer's weights, final norm
    assert report["packed_vs_alone_grad"] <= TOL


def test_padding_and_fixed_pack_size_change_nothing(report):
    assert report["padded_vs_alone_output"] <= TOL


def test_mask_token_replaces_masked_patches(report):
    assert report["mask_ignores_masked_pixels"] <= TOL
    assert report["mask_changes_output"] > 1e-2
    assert report["noise_changes_unmasked_output"] > 1e-2  # the pixel noise is not a no-op
    assert "mask_token=True" in report["mask_without_token_error"]


def test_paper_preset_parameters_and_shapes(report):
    assert report["paper_num_parameters"] == 859_774_464  # ≈ 0.86B, paper §3.1
    assert report["paper_num_layers"] == 28
    assert report["paper_shapes"] == {
        "patch_embed.proj.weight": [1536, 3 * 14 * 14],
        "decoder.layers.0.input_layernorm.weight": [1536],
        "decoder.layers.0.self_attention.linear_qkv.weight": [3 * 1536, 1536],
        "decoder.layers.0.self_attention.linear_proj.weight": [1536, 1536],
        "decoder.layers.0.pre_mlp_layernorm.weight": [1536],
        "decoder.layers.0.mlp.linear_fc1.weight": [2 * 4608, 1536],  # SwiGLU: [gate; up]
        "decoder.layers.0.mlp.linear_fc2.weight": [1536, 4608],
        "decoder.final_layernorm.weight": [1536],
    }
