"""FineViT in plain PyTorch as a transformers ``PreTrainedModel`` (no megatron needed).

Input is a pack of images, as Qwen2-VL's image processor produces it: ``pixel_values``
``[N, C·p·p]`` — every image's patches back to back, each image in merge-window-major order (the
4 patches of a 2×2 window consecutive, windows row by row; ``models.vit.image_to_patches``) — and
``image_grid_thw`` int ``[n, 3]`` = (1, patch rows, patch columns) per image.

Per layer (pre-norm): ``x += o_proj(attn(rope(q), rope(k), v))`` over ``input_layernorm(x)``,
attention bidirectional within each image only; ``x += down(silu(gate(y)) · up(y))`` with
``y = post_attention_layernorm(x)``. A final RMSNorm gives ``last_hidden_state`` ``[N, hidden]``.

2D RoPE: each head's ``d`` channels form ``d/2`` rotary pairs (channel j with j + d/2); the first
``d/4`` pairs rotate by ``row · f_k``, the rest by ``col · f_k``, ``f_k = θ^(-2k/(d/2))``,
where (row, col) is the patch's place in its own image.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import BaseModelOutput

from megatron_finevit.hf.configuration_finevit import FineViTHFConfig


def image_grids(image_grid_thw: torch.Tensor) -> list[tuple[int, int]]:
    """``[n, 3]`` (t, h, w) -> [(h, w)] per image; FineViT encodes still images (t = 1)."""
    grid = torch.as_tensor(image_grid_thw)
    if grid.dim() != 2 or grid.shape[1] != 3 or (grid[:, 0] != 1).any():
        raise ValueError(f"image_grid_thw must be [n, 3] rows (1, h, w), got {grid.tolist()}")
    return [(int(h), int(w)) for _, h, w in grid.tolist()]


def patch_positions(grid_h: int, grid_w: int, merge_size: int) -> torch.Tensor:
    """(row, col) of each patch in merge-window-major order: int64 ``[h · w, 2]``."""
    if grid_h % merge_size or grid_w % merge_size:
        raise ValueError(f"patch grid {grid_h}x{grid_w} is not a multiple of the "
                         f"{merge_size}x{merge_size} merge window")
    rows, cols = torch.meshgrid(torch.arange(grid_h), torch.arange(grid_w), indexing="ij")
    m = merge_size

    def window_major(t):  # [h, w] -> [h/m, m, w/m, m] -> [h/m, w/m, m, m]
        return t.reshape(grid_h // m, m, grid_w // m, m).transpose(1, 2).reshape(-1)

    return torch.stack([window_major(rows), window_major(cols)], dim=1)


class FineViTRotary(nn.Module):
    """cos / sin tables ``[N, head_dim]`` of a pack's 2D rotary angles."""

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        quarter = head_dim // 4
        exponent = torch.arange(quarter, dtype=torch.float64) * 2 / (head_dim // 2)
        self.register_buffer("inv_freq", (theta ** -exponent).float(), persistent=False)

    def forward(self, grids: list[tuple[int, int]], merge_size: int):
        positions = torch.cat([patch_positions(h, w, merge_size) for h, w in grids])
        positions = positions.to(self.inv_freq.device, torch.float32)
        half = torch.cat([positions[:, :1] * self.inv_freq, positions[:, 1:] * self.inv_freq], 1)
        angles = torch.cat([half, half], dim=1)
        return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x`` ``[N, heads, d]``; ``cos`` / ``sin`` ``[N, d]`` (computed in fp32)."""
    first, second = x.float().chunk(2, dim=-1)
    rotated = torch.cat([-second, first], dim=-1)
    out = x.float() * cos[:, None] + rotated * sin[:, None]
    return out.to(x.dtype)


class FineViTAttention(nn.Module):
    def __init__(self, config: FineViTHFConfig):
        super().__init__()
        h = config.hidden_size
        self.heads, self.head_dim = config.num_attention_heads, config.head_dim
        self.q_proj = nn.Linear(h, h, bias=False)
        self.k_proj = nn.Linear(h, h, bias=False)
        self.v_proj = nn.Linear(h, h, bias=False)
        self.o_proj = nn.Linear(h, h, bias=False)

    def forward(self, x, cos, sin, lengths: list[int]):
        """``x`` ``[N, h]``; each image (``lengths`` tokens) attends to itself only."""
        shape = (x.shape[0], self.heads, self.head_dim)
        q = apply_rotary(self.q_proj(x).view(shape), cos, sin)
        k = apply_rotary(self.k_proj(x).view(shape), cos, sin)
        v = self.v_proj(x).view(shape)
        outputs = []
        for q_i, k_i, v_i in zip(q.split(lengths), k.split(lengths), v.split(lengths)):
            # [heads, n_i, d]: one image is one unmasked attention
            o = F.scaled_dot_product_attention(q_i.transpose(0, 1), k_i.transpose(0, 1),
                                               v_i.transpose(0, 1))
            outputs.append(o.transpose(0, 1).reshape(-1, self.heads * self.head_dim))
        return self.o_proj(torch.cat(outputs))


class FineViTMLP(nn.Module):
    def __init__(self, config: FineViTHFConfig):
        super().__init__()
        h, f = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(h, f, bias=False)
        self.up_proj = nn.Linear(h, f, bias=False)
        self.down_proj = nn.Linear(f, h, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class FineViTLayer(nn.Module):
    def __init__(self, config: FineViTHFConfig):
        super().__init__()
        self.input_layernorm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.self_attn = FineViTAttention(config)
        self.post_attention_layernorm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = FineViTMLP(config)

    def forward(self, x, cos, sin, lengths):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, lengths)
        return x + self.mlp(self.post_attention_layernorm(x))


class FineViTPreTrainedModel(PreTrainedModel):
    config_class = FineViTHFConfig
    base_model_prefix = "finevit"
    main_input_name = "pixel_values"
    _no_split_modules = ["FineViTLayer"]

    @torch.no_grad()
    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            module.weight.normal_(0.0, std)
            if module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, nn.RMSNorm):
            module.weight.fill_(1.0)
        elif isinstance(module, FineViTRotary):
            fresh = FineViTRotary(module.inv_freq.numel() * 4, self.config.rope_theta)
            module.inv_freq.copy_(fresh.inv_freq)


class FineViTHFModel(FineViTPreTrainedModel):
    """``pixel_values`` ``[N, C·p·p]`` + ``image_grid_thw`` ``[n, 3]`` -> ``last_hidden_state``
    ``[N, hidden]`` (one row per patch, pack order)."""

    def __init__(self, config: FineViTHFConfig):
        super().__init__(config)
        config.validate_architecture()
        self.patch_embed = nn.Linear(config.patch_dim, config.hidden_size, bias=False)
        self.rotary = FineViTRotary(config.head_dim, config.rope_theta)
        self.layers = nn.ModuleList(FineViTLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_init()

    def forward(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor,
                return_dict: bool | None = None, **kwargs) -> BaseModelOutput | tuple:
        grids = image_grids(image_grid_thw)
        lengths = [h * w for h, w in grids]
        if pixel_values.dim() != 2 or pixel_values.shape != (sum(lengths), self.config.patch_dim):
            raise ValueError(f"pixel_values has shape {tuple(pixel_values.shape)}; the grids "
                             f"imply [{sum(lengths)}, {self.config.patch_dim}]")
        x = self.patch_embed(pixel_values.to(self.patch_embed.weight.dtype))
        cos, sin = self.rotary(grids, self.config.merge_size)
        for layer in self.layers:
            x = layer(x, cos, sin, lengths)
        x = self.norm(x)
        if return_dict is False:
            return (x,)
        return BaseModelOutput(last_hidden_state=x)
