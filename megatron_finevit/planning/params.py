"""Parameter counts of each module as the project builds it (megatron layout: biases, norms,
padded vocabularies), from the configs alone. ``tests/planning/test_plan.py`` checks each against
the ``numel`` of the built tiny module."""

from __future__ import annotations

from megatron_finevit.config.llm import Qwen3Config
from megatron_finevit.config.text import SigLIP2TextConfig
from megatron_finevit.config.vit import FineViTConfig
from megatron_finevit.config.vlm import FineViTVLConfig


def vit_params(vit: FineViTConfig, mask_token: bool = False) -> int:
    """The encoder (+ Stage I's learned mask token, one ``h`` vector)."""
    return vit.num_parameters() + (vit.hidden_size if mask_token else 0)


def mim_head_params(vit: FineViTConfig, teacher_dim: int) -> int:
    return (vit.hidden_size + 1) * teacher_dim


def map_head_params(vit: FineViTConfig, projection_size: int, mlp_ratio: int = 4) -> int:
    """Probe, q / kv / out projections, norm (RMSNorm: weight only), MLP, text projection; all
    linears with bias (``models/heads/map_pool``)."""
    h, m = vit.hidden_size, mlp_ratio * vit.hidden_size
    linears = (h + 1) * h + (h + 1) * 2 * h + (h + 1) * h + (h + 1) * m + (m + 1) * h
    return h + linears + h + (h + 1) * projection_size


def text_tower_params(text: SigLIP2TextConfig) -> int:
    """Embeddings (padded vocabulary, learned positions), LayerNorm layers with biases, final
    LayerNorm, head."""
    h, f = text.hidden_size, text.ffn_hidden_size
    per_layer = 2 * 2 * h + (h + 1) * 3 * h + (h + 1) * h + (h + 1) * f + (f + 1) * h
    return ((text.padded_vocab_size + text.max_position_embeddings) * h
            + text.num_layers * per_layer + 2 * h + (h + 1) * text.projection_size)


def llm_layer_params(llm: Qwen3Config) -> int:
    """One Qwen3 decoder layer: two RMSNorms, GQA projections, q/k norms, SwiGLU MLP."""
    h, f = llm.hidden_size, llm.ffn_hidden_size
    q, kv = llm.num_attention_heads * llm.head_dim, llm.num_query_groups * llm.head_dim
    return 2 * h + h * (q + 2 * kv) + 2 * llm.head_dim + q * h + 3 * h * f


def llm_params(llm: Qwen3Config) -> int:
    """Embedding (padded), layers, final norm, output layer unless tied."""
    table = llm.padded_vocab_size * llm.hidden_size
    return (table * (1 if llm.tie_embeddings else 2) + llm.num_layers * llm_layer_params(llm)
            + llm.hidden_size)


def projector_params(vl: FineViTVLConfig) -> int:
    """RMSNorm over the encoder width, ``Linear(4h, 4h)`` and ``Linear(4h, llm hidden)``."""
    merged = vl.vit.merge_size ** 2 * vl.vit.hidden_size
    return vl.vit.hidden_size + (merged + 1) * merged + (merged + 1) * vl.llm.hidden_size
