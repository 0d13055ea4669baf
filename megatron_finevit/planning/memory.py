"""Memory per GPU: model state under megatron's distributed optimizer (ZeRO-2-like) and
activations per transformer layer.

Model state (bytes per parameter, bf16 training with fp32 master weights, megatron DDP):

* weights: 2 (bf16), held by every DP rank; split over TP and PP;
* gradients: 4 (megatron's fp32 grad buffer, reduce-scattered: each rank holds the full buffer
  until the reduce-scatter, so it counts whole), split over TP and PP;
* optimizer: 12 (fp32 main weights, Adam ``m`` and ``v``) sharded over DP (the distributed
  optimizer; ZeRO-2 in DeepSpeed shards the same 12 B and the gradients — ours keeps the gradient
  buffer whole, the larger of the two);
* a frozen module (Stage I's teacher, a frozen text tower) only its bf16 weights, replicated.

Activations of one layer per token (values kept for backward, local spec; measured exactly by
``planning.selfcheck`` on the built towers), with ``h`` hidden, ``f`` FFN, ``q``/``kv`` the query
and key/value widths (heads × head dim), ``a`` heads, ``g`` query groups, ``d`` head dim:

* each pre-norm: RMSNorm (torch's composite) input, normalised output and ``rstd``: ``2h+1``;
  LayerNorm (fused) input, mean and ``rstd``: ``h+2``; plus its linear's input ``h``;
* attention: ``q`` and ``k`` as SDPA reads them ``q + kv``; ``v``: with RoPE a view that keeps
  the whole fused QKV output alive ``q + 2kv``, without (the text tower) its own copy ``kv``;
  RoPE in THD keeps per-token ``cos``/``sin`` for q and k ``4d``; Qwen3's q/k norms keep their
  inputs and outputs ``2q + kv`` and ``a + g`` ``rstd``; the output ``q``, its log-sum-exp ``a``
  and the output projection's input ``q``;
* MLP: gated (SwiGLU) ``5f`` (fc1 output ``2f``, ``silu(gate)``, the product, fc2's input);
  GELU ``2f`` (fc1 output, GELU output).

Flash attention keeps no ``n×n`` scores. Full recompute keeps only each layer's input ``h``
(megatron's ``recompute_granularity=full``, ``method=uniform``) plus one layer's activations while
it is recomputed. TE's fused norms and RoPE keep a little less than the local spec; the local spec
is the measured upper bound.
"""

from __future__ import annotations

from dataclasses import dataclass

BYTES_WEIGHT, BYTES_GRAD, BYTES_OPTIMIZER = 2, 4, 12


@dataclass(frozen=True)
class LayerShape:
    """The widths of one transformer layer that its activations depend on."""

    hidden: int
    ffn: int
    q_width: int
    kv_width: int
    heads: int
    head_dim: int
    gated: bool = True
    layer_norm: bool = False      # LayerNorm (mean and rstd kept) rather than RMSNorm
    qk_norm: bool = False
    per_token_rope: bool = False  # RoPE in THD: cos/sin per token kept (ViT, Qwen3 packs)

    @classmethod
    def of(cls, config) -> "LayerShape":
        """From a ``FineViTConfig``, ``SigLIP2TextConfig`` or ``Qwen3Config``."""
        from megatron_finevit.config.llm import Qwen3Config
        from megatron_finevit.config.text import SigLIP2TextConfig
        from megatron_finevit.config.vit import FineViTConfig

        if isinstance(config, Qwen3Config):
            q, kv = config.num_attention_heads * config.head_dim, \
                config.num_query_groups * config.head_dim
            return cls(config.hidden_size, config.ffn_hidden_size, q, kv,
                       config.num_attention_heads, config.head_dim, qk_norm=True,
                       per_token_rope=True)
        h = config.hidden_size
        if isinstance(config, SigLIP2TextConfig):
            return cls(h, config.ffn_hidden_size, h, h, config.num_attention_heads,
                       config.head_dim, gated=False, layer_norm=True)
        if isinstance(config, FineViTConfig):
            return cls(h, config.ffn_hidden_size, h, h, config.num_attention_heads,
                       config.head_dim, per_token_rope=True)
        raise TypeError(f"no layer shape for {type(config).__name__}")

    def values_per_token(self) -> float:
        """Values one token keeps in this layer for backward (module docstring)."""
        f = self.ffn
        return self.norm_values() + self.attention_values() + (5 * f if self.gated else 2 * f)

    def norm_values(self) -> float:
        """The two pre-norms and their linears' inputs (replicated over TP without SP)."""
        h = self.hidden
        return 2 * ((h + 2 if self.layer_norm else 2 * h + 1) + h)

    def attention_values(self) -> float:
        q, kv, a = self.q_width, self.kv_width, self.heads
        rope = self.per_token_rope
        values = q + kv + (q + 2 * kv if rope else kv) + q + a + q
        if rope:
            values += 4 * self.head_dim
        if self.qk_norm:
            values += 2 * q + kv + a + kv // self.head_dim
        return values


def layer_activation_bytes(shape: LayerShape, tokens: int, bytes_per_value: int = 2,
                           tensor_parallel: int = 1, sequence_parallel: bool = False) -> float:
    """Bytes one layer keeps for backward over ``tokens`` tokens. Under TP the widths inside
    attention and the MLP split; the norms' tensors split only with sequence parallelism
    (Korthikanti et al.'s accounting)."""
    split = (shape.values_per_token() - shape.norm_values()) / tensor_parallel
    replicated = shape.norm_values() / (tensor_parallel if sequence_parallel else 1)
    return tokens * bytes_per_value * (split + replicated)


@dataclass(frozen=True)
class StateBytes:
    """Model-state bytes on one GPU."""

    weights: float
    grads: float
    optimizer: float
    frozen: float

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.optimizer + self.frozen


def state_bytes(trained_params: float, frozen_params: float, model_parallel: int,
                data_parallel: int, distributed_optimizer: bool = True) -> StateBytes:
    """Per-GPU model state for ``trained_params`` split over ``model_parallel`` (TP × PP) ranks,
    the optimizer sharded over ``data_parallel`` ranks, plus ``frozen_params`` bf16 weights
    (replicated: a teacher runs whole on every rank that needs it)."""
    local = trained_params / model_parallel
    shards = data_parallel if distributed_optimizer else 1
    return StateBytes(weights=BYTES_WEIGHT * local, grads=BYTES_GRAD * local,
                      optimizer=BYTES_OPTIMIZER * local / shards,
                      frozen=BYTES_WEIGHT * frozen_params)
