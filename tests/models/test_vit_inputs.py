"""FineViT inputs on one process, no model: patch order, packing, the CP/SP layout, 2D RoPE
against a naive per-position rotation (through megatron's own RoPE code), config validation."""

import math
from types import SimpleNamespace

import pytest
import torch
from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb

from megatron_finevit.config.vit import FineViTConfig, finevit_0p86b, tiny_vit, vit_preset
from megatron_finevit.models.attention import cp_partition_index
from megatron_finevit.models.specs import BackendUnavailable
from megatron_finevit.models.vit import (
    check_image_size,
    image_to_patches,
    pack_images,
    packed_rope_freqs,
    prepare_encoder_input,
)
from megatron_finevit.models.vit.rope2d import window_major_positions

SIZES = [(56, 84), (28, 28), (84, 56), (28, 112)]  # (H, W) pixels, all multiples of 28


def _images(sizes=SIZES, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(3, h, w, generator=g) for h, w in sizes]


def _coordinate_image(grid_h, grid_w, p=14):
    """Channel 0 holds each pixel's patch row, channel 1 its patch column."""
    rows = torch.arange(grid_h * p) // p
    cols = torch.arange(grid_w * p) // p
    return torch.stack([rows[:, None].expand(-1, grid_w * p), cols[None].expand(grid_h * p, -1),
                        torch.zeros(grid_h * p, grid_w * p, dtype=torch.long)]).float()


# --- patches and packing ------------------------------------------------------------------------


def test_patches_are_merge_window_major():
    patches, grid = image_to_patches(_coordinate_image(4, 6))
    assert grid == (4, 6) and patches.shape == (24, 3 * 14 * 14)
    rows, cols = patches[:, 0].long(), patches[:, 14 * 14].long()
    # naive order: windows row by row, inside a window TL, TR, BL, BR
    expected = [(2 * wr + dr, 2 * wc + dc) for wr in range(2) for wc in range(3)
                for dr in range(2) for dc in range(2)]
    assert list(zip(rows.tolist(), cols.tolist())) == expected
    # every pixel of a patch row belongs to that patch
    assert (patches[:, :196] == patches[:, :1]).all() and (patches[:, 196:392] == patches[:, 196:197]).all()
    # the 2D RoPE positions follow the same order
    r, c = window_major_positions(4, 6)
    assert torch.equal(r, rows) and torch.equal(c, cols)


def test_patch_linear_equals_convolution():
    image = _images([(56, 84)])[0]
    weight = torch.randn(8, 3, 14, 14, dtype=torch.float64)
    conv = torch.nn.functional.conv2d(image[None].double(), weight, stride=14)[0]  # [8, 4, 6]
    patches, (gh, gw) = image_to_patches(image.double())
    linear = patches @ weight.reshape(8, -1).T  # [24, 8]
    rows, cols = window_major_positions(gh, gw)
    torch.testing.assert_close(linear, conv[:, rows, cols].T)


@pytest.mark.parametrize("size", [(30, 56), (56, 42), (14, 28), (0, 28)])
def test_sides_not_multiple_of_28_are_refused(size):
    with pytest.raises(ValueError, match="multiples of 28"):
        image_to_patches(torch.zeros(3, *size))
    with pytest.raises(ValueError, match="smart_resize"):
        check_image_size(*size)


def test_pack_images_concatenates_with_cu_seqlens_and_grids():
    images = _images()
    packed = pack_images(images, pad_to=200)
    lengths = [h * w // 196 for h, w in SIZES]
    assert packed.cu_seqlens.dtype == torch.int32
    assert packed.cu_seqlens.tolist() == [0, *torch.tensor(lengths).cumsum(0).tolist(), 200]
    assert packed.grids.tolist() == [[h // 14, w // 14] for h, w in SIZES]
    for i, image in enumerate(images):
        a, b = packed.cu_seqlens[i].item(), packed.cu_seqlens[i + 1].item()
        assert torch.equal(packed.patches[a:b], image_to_patches(image)[0])
    assert (packed.patches[sum(lengths):] == 0).all()
    with pytest.raises(ValueError, match="do not fit"):
        pack_images(images, pad_to=10)


# --- layout: CP partition, SP divisibility, padding --------------------------------------------


@pytest.mark.parametrize("cp,sp,total", [(1, 1, None), (1, 2, None), (2, 1, 96), (4, 1, None),
                                         (2, 2, None), (4, 2, 128)])
def test_layout_partitions_the_pack(cp, sp, total):
    packed = pack_images(_images(), pad_to=90)
    n_real = sum(packed.image_lengths)
    values = torch.arange(n_real).float()[:, None] + 1  # per-token data, 1-based
    parts = [prepare_encoder_input(packed, cp, r, sp_size=sp, total_tokens=total)
             for r in range(cp)]
    first = parts[0]
    bounds = first.padded_bounds.tolist()
    lengths = [b - a for a, b in zip(bounds, bounds[1:])]
    if cp > 1:
        assert all(n % (2 * cp) == 0 for n in lengths)
    assert first.total_tokens % (cp * sp) == 0 and first.total_tokens >= 90
    # every padded row is held by exactly one rank; real tokens keep their content and order
    held = torch.cat([p.local_index for p in parts])
    assert sorted(held.tolist()) == list(range(first.total_tokens))
    assert torch.equal(first.source_index[first.source_index >= 0], torch.arange(n_real))
    for p in parts:
        assert len(p.patches) * cp == p.total_tokens
        source = p.source_index[p.local_index]
        real = source >= 0
        assert torch.equal(p.patches[real], packed.patches[source[real]])
        assert (p.patches[~real] == 0).all()
        local = p.to_local(values)
        assert torch.equal(local[real, 0], source[real].float() + 1) and (local[~real] == 0).all()
    # real-token boundaries: images first, then a padding segment without real tokens
    real_lengths = (first.cu_seqlens[1:] - first.cu_seqlens[:-1]).tolist()
    assert real_lengths[:4] == packed.image_lengths and all(n == 0 for n in real_lengths[4:])


def test_layout_rejects_a_too_small_or_misaligned_pack():
    packed = pack_images(_images())
    with pytest.raises(ValueError, match="total_tokens"):
        prepare_encoder_input(packed, 2, 0, total_tokens=64)  # images alone need 72
    with pytest.raises(ValueError, match="multiple of 8"):
        prepare_encoder_input(packed, 4, 0, total_tokens=84)


# --- 2D RoPE -----------------------------------------------------------------------------------


def _naive_rope(x, rows, cols, theta=10_000.0):
    """Rotate channel pairs (j, j + d/2) of every token by hand: pairs j < d/4 by row·f_j, the
    others by col·f_(j − d/4), f_k = θ^(−2k / (d/2))."""
    t, h, d = x.shape
    out = x.clone()
    for i in range(t):
        for j in range(d // 2):
            k = j % (d // 4)
            angle = (rows[i] if j < d // 4 else cols[i]) * theta ** (-2 * k / (d // 2))
            c, s = math.cos(angle), math.sin(angle)
            a, b = x[i, :, j], x[i, :, j + d // 2]
            out[i, :, j], out[i, :, j + d // 2] = a * c - b * s, b * c + a * s
    return out


def _megatron_config():
    return SimpleNamespace(apply_rope_fusion=False, rotary_interleaved=False,
                           multi_latent_attention=False)


def _group(size, rank):
    return SimpleNamespace(size=lambda: size, rank=lambda: rank)


def test_2d_rope_equals_naive_per_position_rotation():
    grids = [(4, 6), (2, 2), (2, 8)]
    cu = torch.tensor([0, 24, 28, 44], dtype=torch.int32)
    head_dim = 16
    q = torch.randn(44, 2, head_dim, dtype=torch.float64)
    freqs = packed_rope_freqs(grids, cu, head_dim)
    assert freqs.shape == (44, 1, 1, head_dim) and freqs.dtype == torch.float32
    got = apply_rotary_pos_emb(q, freqs.double(), _megatron_config(), cu_seqlens=cu,
                               cp_group=_group(1, 0))
    rows, cols = zip(*(window_major_positions(gh, gw) for gh, gw in grids))
    expected = _naive_rope(q, torch.cat(rows).tolist(), torch.cat(cols).tolist())
    torch.testing.assert_close(got, expected)


def test_2d_rope_padding_rows_are_identity_and_cp_ranks_get_their_rows():
    """With per-image CP padding the table has one row per padded position; megatron's THD RoPE
    under CP picks each rank's rows, matching the full-pack rotation."""
    packed = pack_images(_images([(84, 28), (28, 28)]))  # 12 + 4 tokens: padded to 16 + 8
    cp, head_dim = 4, 8
    layout = prepare_encoder_input(packed, cp, 0)
    freqs = packed_rope_freqs(layout.grids, layout.cu_seqlens, head_dim,
                              cu_seqlens_padded=layout.cu_seqlens_padded)
    bounds = layout.padded_bounds
    q = torch.randn(layout.total_tokens, 1, head_dim, dtype=torch.float64)
    full = apply_rotary_pos_emb(q, freqs.double(), _megatron_config(), cu_seqlens=bounds,
                                cp_group=_group(1, 0))
    padding = layout.source_index < 0
    assert padding.any() and torch.equal(full[padding], q[padding])
    for rank in range(cp):
        index = cp_partition_index(bounds, cp, rank)
        local = apply_rotary_pos_emb(q[index], freqs.double(), _megatron_config(),
                                     cu_seqlens=bounds, cp_group=_group(cp, rank))
        torch.testing.assert_close(local, full[index])


# --- config ------------------------------------------------------------------------------------


def test_paper_preset_matches_table_1():
    vit = finevit_0p86b()
    assert (vit.num_layers, vit.patch_size, vit.hidden_size, vit.ffn_hidden_size,
            vit.num_attention_heads) == (28, 14, 1536, 4608, 16)
    assert vit.num_parameters() == 859_774_464  # "approximately 0.86 billion" (paper §3.1)
    assert vit_preset("tiny_vit") == tiny_vit()


@pytest.mark.parametrize("changes,tp,message", [
    (dict(hidden_size=72, num_attention_heads=4), 1, "head_dim=18 must be a multiple of 4"),
    (dict(), 3, "tensor_parallel=3 does not divide num_attention_heads"),
    (dict(fp8="hybrid"), 1, "needs spec_backend='te'"),
    (dict(spec_backend="cuda"), 1, "spec_backend='cuda' must be one of"),
    (dict(fp8_recipe="fancy"), 1, "fp8_recipe='fancy'"),
    (dict(num_layers=0), 1, "num_layers=0 must be positive"),
])
def test_config_errors_are_clear(changes, tp, message):
    with pytest.raises(ValueError, match=message):
        tiny_vit(**changes).validate(tensor_parallel=tp)


def test_te_backend_without_transformer_engine_fails_at_config_time():
    with pytest.raises(BackendUnavailable, match="TransformerEngine"):
        tiny_vit(spec_backend="te", fp8="hybrid").to_transformer_config()


def test_config_round_trips_and_refuses_unknown_fields():
    vit = tiny_vit(fp8=None)
    assert FineViTConfig.from_dict(vit.to_dict()) == vit
    with pytest.raises(ValueError, match="unknown FineViTConfig fields"):
        FineViTConfig.from_dict({**vit.to_dict(), "class_token": True})
