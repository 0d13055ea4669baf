"""Qwen3 language-model configuration: the public models' shapes as presets, plus tiny ones.

One dataclass describes the architecture the way Hugging Face's ``Qwen3Config`` does (so the
checkpoint converter can translate it field by field); ``to_transformer_config`` turns it into
megatron-core's ``TransformerConfig`` for a given parallel layout.

Vocabulary padding
------------------
Megatron-LM pads the embedding table to a multiple of ``make_vocab_size_divisible_by × TP``, so
the table's global shape — and therefore the checkpoint — changes with TP, and a checkpoint saved
at one TP cannot be loaded at another. We pad to a multiple of ``vocab_pad_multiple`` (default
128, the GEMM-friendly granularity) *independent of TP* and require TP to divide the padded size:
Qwen3's 151,936 rows = 2^7 · 1187 are already a multiple of 128 and split evenly for every TP up
to 128, and the megatron checkpoint loads at any TP. The padded rows are zero after an HF import
and are never addressed by a token id; export keeps only the first ``vocab_size`` rows (the size
of the HF embedding table, which is itself a padded superset of the tokenizer's 151,669 ids).
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
    round_up,
    spec_backend_problems,
    transformer_config,
)

QWEN3_BOS_ID = 151643  # <|endoftext|>
QWEN3_EOS_ID = 151645  # <|im_end|>


@dataclass(frozen=True)
class Qwen3Config(DictConfig):
    """Qwen3 decoder shapes (names follow megatron; HF names in comments).

    Attention is GQA with per-head RMSNorm on q and k, RoPE on the full head dim, SwiGLU MLP,
    no biases, pre-norm RMSNorm. ``spec_backend`` / ``fp8`` / ``fp8_recipe`` choose the layer
    implementation as for the encoder (``config/vit.py``); they do not change the checkpoint.
    """

    num_layers: int                 # num_hidden_layers
    hidden_size: int                # hidden_size
    ffn_hidden_size: int            # intermediate_size
    num_attention_heads: int        # num_attention_heads
    num_query_groups: int           # num_key_value_heads
    head_dim: int                   # head_dim (megatron kv_channels)
    vocab_size: int = 151936        # rows of the HF embedding table
    tie_embeddings: bool = False    # tie_word_embeddings
    rope_theta: float = 1_000_000.0
    norm_eps: float = 1e-6          # rms_norm_eps
    max_position_embeddings: int = 40960
    vocab_pad_multiple: int = 128
    init_std: float = 0.02          # initializer_range
    bos_token_id: int | None = QWEN3_BOS_ID
    eos_token_id: int | None = QWEN3_EOS_ID
    spec_backend: str = "local"          # "local" (torch; CPU) or "te" (TransformerEngine; GPU)
    fp8: str | None = None               # None, "hybrid" or "e4m3"; needs spec_backend "te"
    fp8_recipe: str = "delayed"          # megatron Fp8Recipe name, used when fp8 is set
    # megatron's activation recompute (common.recompute_problems): None, "full" or "selective"
    recompute_granularity: str | None = None
    recompute_method: str | None = None  # full: "uniform" or "block"
    recompute_num_layers: int | None = None  # full: layers per recomputed chunk (uniform) or
                                             # recomputed layers per pipeline stage (block)

    @property
    def padded_vocab_size(self) -> int:
        """Rows of megatron's embedding / output table (see the module docstring)."""
        return round_up(self.vocab_size, self.vocab_pad_multiple)

    def validate(self, tensor_parallel: int = 1, pipeline_parallel: int = 1,
                 context_parallel: int = 1) -> None:
        """Raise ValueError listing every inconsistency, before any tensor is allocated."""
        problems = self.problems(tensor_parallel, pipeline_parallel, context_parallel)
        if problems:
            raise ValueError("invalid Qwen3 config: " + "; ".join(problems))
        require_spec_backend(self)

    def problems(self, tensor_parallel: int = 1, pipeline_parallel: int = 1,
                 context_parallel: int = 1) -> list[str]:
        """One line per inconsistency of these shapes at this parallel layout (whether this
        machine has TransformerEngine for ``spec_backend='te'`` is ``validate``'s business)."""
        problems = nonpositive_fields(self)
        if self.num_attention_heads % self.num_query_groups:
            problems.append(f"num_query_groups={self.num_query_groups} does not divide "
                            f"num_attention_heads={self.num_attention_heads}")
        problems += indivisible_by(self, tensor_parallel,
                                   ("num_attention_heads", "num_query_groups", "ffn_hidden_size"))
        if self.padded_vocab_size % tensor_parallel:
            problems.append(f"tensor_parallel={tensor_parallel} does not divide the padded "
                            f"vocabulary {self.padded_vocab_size}")
        # megatron splits the layers evenly over the stages
        problems += indivisible_by(self, pipeline_parallel, ("num_layers",), "pipeline_parallel")
        if self.head_dim % 2:
            problems.append(f"head_dim={self.head_dim} must be even for RoPE")
        if context_parallel < 1:
            problems.append(f"context_parallel={context_parallel} must be >= 1")
        problems += spec_backend_problems(self) + recompute_problems(self)
        return problems

    def to_transformer_config(self, tensor_parallel: int = 1, pipeline_parallel: int = 1,
                              context_parallel: int = 1, sequence_parallel: bool = False,
                              params_dtype: torch.dtype = torch.float32, **overrides):
        """megatron ``TransformerConfig`` for this model at the given parallel layout.

        ``params_dtype`` bf16 switches megatron's bf16 mode on. ``overrides`` set any other
        ``TransformerConfig`` field (e.g. ``perform_initialization``; the activation recompute is
        this config's own).
        """
        self.validate(tensor_parallel, pipeline_parallel, context_parallel)
        return transformer_config(
            tensor_parallel=tensor_parallel, pipeline_parallel=pipeline_parallel,
            context_parallel=context_parallel, sequence_parallel=sequence_parallel,
            params_dtype=params_dtype, overrides=overrides,
            num_layers=self.num_layers,
            hidden_size=self.hidden_size,
            ffn_hidden_size=self.ffn_hidden_size,
            num_attention_heads=self.num_attention_heads,
            num_query_groups=self.num_query_groups,
            kv_channels=self.head_dim,
            normalization="RMSNorm",
            layernorm_epsilon=self.norm_eps,
            gated_linear_unit=True,
            activation_func=torch.nn.functional.silu,
            add_bias_linear=False,
            add_qkv_bias=False,
            qk_layernorm=True,
            init_method_std=self.init_std,
            fp8=self.fp8,
            fp8_recipe=self.fp8_recipe,
            **{name: getattr(self, name) for name in RECOMPUTE_FIELDS},
        )



# --- presets: the public Qwen3 checkpoints' config.json values --------------------------------


def qwen3_0p6b() -> Qwen3Config:
    return Qwen3Config(num_layers=28, hidden_size=1024, ffn_hidden_size=3072,
                       num_attention_heads=16, num_query_groups=8, head_dim=128,
                       tie_embeddings=True)


def qwen3_1p7b() -> Qwen3Config:
    return Qwen3Config(num_layers=28, hidden_size=2048, ffn_hidden_size=6144,
                       num_attention_heads=16, num_query_groups=8, head_dim=128,
                       tie_embeddings=True)


def qwen3_8b() -> Qwen3Config:
    return Qwen3Config(num_layers=36, hidden_size=4096, ffn_hidden_size=12288,
                       num_attention_heads=32, num_query_groups=8, head_dim=128,
                       tie_embeddings=False)


def tiny_qwen3(**changes) -> Qwen3Config:
    """A CPU-test model with the real Qwen tokenizer's 151,669 ids (so real text tokenizes into
    it) — not a multiple of 128, so vocabulary padding is exercised — and GQA 4:2."""
    base = Qwen3Config(num_layers=4, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4,
                       num_query_groups=2, head_dim=16, vocab_size=151669,
                       max_position_embeddings=512, tie_embeddings=True)
    return replace(base, **changes)


QWEN3_PRESETS = {
    "qwen3_0p6b": qwen3_0p6b,
    "qwen3_1p7b": qwen3_1p7b,
    "qwen3_8b": qwen3_8b,
    "tiny_qwen3": tiny_qwen3,
}


def qwen3_preset(name: str) -> Qwen3Config:
    if name not in QWEN3_PRESETS:
        raise ValueError(f"unknown Qwen3 preset {name!r}; choose one of {sorted(QWEN3_PRESETS)}")
    return QWEN3_PRESETS[name]()
