"""FineViT encoder configuration: the paper's architecture (Table 1) as a preset, plus tiny ones.

Paper §3.1 / Table 1: 28 layers, patch 14, hidden 1536, intermediate 4608 with SiLU gating
(SwiGLU), 16 heads, 2D RoPE, no class token; images resized so both sides are multiples of 28 (the
2×2 patch merge before the LLM). Pre-norm RMSNorm and bias-free linears give 0.8598B parameters
(``tools/model_summary.py finevit_0p86b``), the paper's "approximately 0.86 billion".

``to_transformer_config`` turns the dataclass into megatron-core's ``TransformerConfig`` for one
parallel layout; the layer-spec backend (``local`` torch modules or ``te`` TransformerEngine) and
FP8 are part of this config and validated here, before any tensor exists.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from megatron_finevit.config.common import (
    RECOMPUTE_FIELDS,
    DictConfig,
    indivisible_by,
    nonpositive_fields,
    recompute_problems,
    require_spec_backend,
    spec_backend_problems,
    transformer_config,
)


@dataclass(frozen=True)
class FineViTConfig(DictConfig):
    """FineViT encoder shapes and implementation choices.

    ``merge_size`` is the side of the projector's patch-merge window (2 → 2×2 patches): image
    sides must be multiples of ``patch_size · merge_size`` (28 pixels).
    """

    num_layers: int = 28
    hidden_size: int = 1536
    ffn_hidden_size: int = 4608
    num_attention_heads: int = 16
    patch_size: int = 14
    in_channels: int = 3
    merge_size: int = 2
    rope_theta: float = 10_000.0
    norm_eps: float = 1e-6
    add_bias_linear: bool = False
    init_std: float = 0.02
    spec_backend: str = "local"          # "local" (torch; CPU) or "te" (TransformerEngine; GPU)
    fp8: str | None = None               # None, "hybrid" or "e4m3"; needs spec_backend "te"
    fp8_recipe: str = "delayed"          # megatron Fp8Recipe name, used when fp8 is set
    # megatron's activation recompute (common.recompute_problems): None, "full" or "selective"
    recompute_granularity: str | None = None
    recompute_method: str | None = None  # full: "uniform" or "block"
    recompute_num_layers: int | None = None  # full: layers per recomputed chunk (uniform) or
                                             # recomputed layers per pipeline stage (block)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def patch_dim(self) -> int:
        """Values per patch: ``in_channels · patch_size²`` (588 for RGB 14×14)."""
        return self.in_channels * self.patch_size * self.patch_size

    @property
    def side_multiple(self) -> int:
        """Image sides must be multiples of this many pixels (28)."""
        return self.patch_size * self.merge_size

    def validate(self, tensor_parallel: int = 1, pipeline_parallel: int = 1,
                 context_parallel: int = 1) -> None:
        """Raise ValueError listing every inconsistency, before any tensor is allocated."""
        problems = self.problems(tensor_parallel, pipeline_parallel, context_parallel)
        if problems:
            raise ValueError("invalid FineViT config: " + "; ".join(problems))
        require_spec_backend(self)

    def problems(self, tensor_parallel: int = 1, pipeline_parallel: int = 1,
                 context_parallel: int = 1) -> list[str]:
        """One line per inconsistency of these shapes at this parallel layout (whether this
        machine has TransformerEngine for ``spec_backend='te'`` is ``validate``'s business)."""
        problems = nonpositive_fields(self, ("int", "float"))
        if problems:
            return problems
        if self.hidden_size % self.num_attention_heads:
            problems.append(f"num_attention_heads={self.num_attention_heads} does not divide "
                            f"hidden_size={self.hidden_size}")
        elif self.head_dim % 4:
            # 2D RoPE: half the rotary pairs follow the row, half the column.
            problems.append(f"head_dim={self.head_dim} must be a multiple of 4 for 2D RoPE")
        problems += indivisible_by(self, tensor_parallel,
                                   ("num_attention_heads", "ffn_hidden_size"))
        # megatron splits the layers evenly over the stages
        problems += indivisible_by(self, pipeline_parallel, ("num_layers",), "pipeline_parallel")
        if context_parallel < 1:
            problems.append(f"context_parallel={context_parallel} must be >= 1")
        problems += spec_backend_problems(self) + recompute_problems(self)
        return problems

    def to_transformer_config(self, tensor_parallel: int = 1, pipeline_parallel: int = 1,
                              context_parallel: int = 1, sequence_parallel: bool = False,
                              params_dtype: torch.dtype = torch.float32, **overrides):
        """megatron ``TransformerConfig`` for this encoder at the given parallel layout.

        ``params_dtype`` bf16 switches megatron's bf16 mode on; ``overrides`` set any other
        ``TransformerConfig`` field (the activation recompute is this config's own).
        """
        self.validate(tensor_parallel, pipeline_parallel, context_parallel)
        te = self.spec_backend == "te"
        return transformer_config(
            tensor_parallel=tensor_parallel, pipeline_parallel=pipeline_parallel,
            context_parallel=context_parallel, sequence_parallel=sequence_parallel,
            params_dtype=params_dtype, overrides=overrides,
            num_layers=self.num_layers,
            hidden_size=self.hidden_size,
            ffn_hidden_size=self.ffn_hidden_size,
            num_attention_heads=self.num_attention_heads,
            kv_channels=self.head_dim,
            normalization="RMSNorm",
            layernorm_epsilon=self.norm_eps,
            gated_linear_unit=True,
            activation_func=torch.nn.functional.silu,
            add_bias_linear=self.add_bias_linear,
            add_qkv_bias=self.add_bias_linear,
            init_method_std=self.init_std,
            # TE's THD context parallelism exchanges K/V ring-wise; ours all-gathers them.
            cp_comm_type=("p2p" if te else "all_gather") if context_parallel > 1 else None,
            fp8=self.fp8,
            fp8_recipe=self.fp8_recipe,
            **{name: getattr(self, name) for name in RECOMPUTE_FIELDS},
        )

    def num_parameters(self) -> int:
        """Parameters of the encoder (patch embedding, layers, final norm), from the shapes."""
        h, f, bias = self.hidden_size, self.ffn_hidden_size, int(self.add_bias_linear)
        attention = 4 * h * h + bias * 4 * h
        mlp = 3 * h * f + bias * (2 * f + h)
        per_layer = attention + mlp + 2 * h  # + the two RMSNorm weights
        return self.patch_dim * h + self.num_layers * per_layer + h  # + the final norm



# --- presets ------------------------------------------------------------------------------------


def finevit_0p86b(**changes) -> FineViTConfig:
    """The paper's encoder (Table 1)."""
    return replace(FineViTConfig(), **changes)


def tiny_vit(**changes) -> FineViTConfig:
    """A CPU-test encoder: 4 layers of width 64, 4 heads of 16 (2D RoPE needs head_dim % 4 == 0),
    FFN 96, the paper's 14-pixel patches."""
    base = FineViTConfig(num_layers=4, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4)
    return replace(base, **changes)


def small_vit(**changes) -> FineViTConfig:
    """A benchmark-sized encoder for ``tools/bench_vit.py --quick``: the paper's width per head
    (96) at 1/4 of its hidden size and depth."""
    base = FineViTConfig(num_layers=7, hidden_size=384, ffn_hidden_size=1152,
                         num_attention_heads=4)
    return replace(base, **changes)


VIT_PRESETS = {"finevit_0p86b": finevit_0p86b, "tiny_vit": tiny_vit, "small_vit": small_vit}


def vit_preset(name: str, **changes) -> FineViTConfig:
    if name not in VIT_PRESETS:
        raise ValueError(f"unknown FineViT preset {name!r}; choose one of {sorted(VIT_PRESETS)}")
    return VIT_PRESETS[name](**changes)
