"""SigLIP2 text tower configuration: the encoder FineViT's Stage II starts from, plus a tiny one.

The paper initialises the Stage II text tower from SigLIP2 giant's text encoder. SigLIP2 g-opt
pairs its 1B vision encoder with a **So400m-shaped text encoder** whose pooled output is projected
to the image embedding width: 27 layers, hidden 1152, MLP 4304 (GELU, tanh approximation),
16 heads of 72, LayerNorm ε 1e-6, biases everywhere, learned absolute positions over 64 tokens,
the 256k Gemma vocabulary, and a linear head 1152 → 1536. Sources: big_vision's
``SigLIP2_demo.ipynb`` ("the g-opt vision encoder is paired with a So400m text encoder",
``EMBDIM['g-opt'] = 1536``, ``VOCAB = 256_000``, ``SEQLEN = 64``) and big_vision's So400m variant
(width 1152, depth 27, mlp 4304, heads 16); transformers' ``Siglip2TextConfig`` supplies the
activation (``gelu_pytorch_tanh``) and ε defaults.

Fields follow megatron's names; Hugging Face's are in the comments, so the converter
(``convert/siglip2_text.py``) translates ``config.json`` field by field. ``to_transformer_config``
builds megatron-core's ``TransformerConfig`` for one parallel layout.

Vocabulary padding is the LLM's rule (``config/llm.py``): pad to a multiple of
``vocab_pad_multiple`` independent of TP, so checkpoints load at any TP. 256,000 = 2000 · 128.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import torch

from megatron_finevit.config.common import (
    DictConfig,
    indivisible_by,
    nonpositive_fields,
    round_up,
    transformer_config,
)

SPEC_BACKENDS = ("local", "te")
GEMMA_PAD_ID, GEMMA_EOS_ID, GEMMA_BOS_ID = 0, 1, 2  # the Gemma SentencePiece model SigLIP2 uses


@dataclass(frozen=True)
class SigLIP2TextConfig(DictConfig):
    """SigLIP2 text encoder shapes (pre-norm LayerNorm transformer, bidirectional attention over
    the whole padded row, last-token pooling, linear head)."""

    num_layers: int = 27                  # num_hidden_layers
    hidden_size: int = 1152               # hidden_size
    ffn_hidden_size: int = 4304           # intermediate_size
    num_attention_heads: int = 16         # num_attention_heads
    projection_size: int = 1536           # projection_size (head output = image embedding width)
    vocab_size: int = 256_000             # vocab_size (rows of the HF table)
    max_position_embeddings: int = 64     # max_position_embeddings (the context length)
    norm_eps: float = 1e-6                # layer_norm_eps
    vocab_pad_multiple: int = 128
    init_std: float = 0.02
    pad_token_id: int | None = GEMMA_PAD_ID
    bos_token_id: int | None = GEMMA_BOS_ID
    eos_token_id: int | None = GEMMA_EOS_ID
    spec_backend: str = "local"           # "local" (torch; CPU) or "te" (TransformerEngine; GPU)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def padded_vocab_size(self) -> int:
        """Rows of megatron's embedding table (zeros after ``vocab_size``)."""
        return round_up(self.vocab_size, self.vocab_pad_multiple)

    def validate(self, tensor_parallel: int = 1, pipeline_parallel: int = 1,
                 context_parallel: int = 1) -> None:
        """Raise ValueError listing every inconsistency, before any tensor is allocated."""
        problems = self.problems(tensor_parallel, pipeline_parallel, context_parallel)
        if problems:
            raise ValueError("invalid SigLIP2 text config: " + "; ".join(problems))

    def problems(self, tensor_parallel: int = 1, pipeline_parallel: int = 1,
                 context_parallel: int = 1) -> list[str]:
        """One line per inconsistency of these shapes at this parallel layout."""
        problems = nonpositive_fields(self)
        if self.hidden_size % self.num_attention_heads:
            problems.append(f"num_attention_heads={self.num_attention_heads} does not divide "
                            f"hidden_size={self.hidden_size}")
        problems += indivisible_by(self, tensor_parallel,
                                   ("num_attention_heads", "ffn_hidden_size", "padded_vocab_size"))
        if pipeline_parallel != 1:
            problems.append(f"pipeline_parallel={pipeline_parallel}: the text tower runs whole "
                            "on every pipeline-first rank (it is small); use pipeline_parallel=1")
        if context_parallel != 1:
            problems.append(f"context_parallel={context_parallel}: text rows are at most a few "
                            "hundred tokens; context parallelism is not supported here")
        if self.spec_backend not in SPEC_BACKENDS:
            problems.append(f"spec_backend must be one of {SPEC_BACKENDS}, "
                            f"got {self.spec_backend!r}")
        return problems

    def to_transformer_config(self, tensor_parallel: int = 1, sequence_parallel: bool = False,
                              params_dtype: torch.dtype = torch.float32, **overrides):
        """megatron ``TransformerConfig`` for the tower at the given TP (and SP).

        ``overrides`` set any other ``TransformerConfig`` field (``perform_initialization``,
        ``recompute_granularity`` ...).
        """
        self.validate(tensor_parallel)
        return transformer_config(
            tensor_parallel=tensor_parallel, sequence_parallel=sequence_parallel,
            params_dtype=params_dtype, overrides=overrides,
            num_layers=self.num_layers,
            hidden_size=self.hidden_size,
            ffn_hidden_size=self.ffn_hidden_size,
            num_attention_heads=self.num_attention_heads,
            kv_channels=self.head_dim,
            normalization="LayerNorm",
            layernorm_epsilon=self.norm_eps,
            # SigLIP's MLP: fc1 -> GELU (tanh approximation) -> fc2. A partial, not a lambda, so
            # the config stays picklable.
            activation_func=functools.partial(torch.nn.functional.gelu, approximate="tanh"),
            gated_linear_unit=False,
            add_bias_linear=True,
            add_qkv_bias=True,
            init_method_std=self.init_std,
        )



def siglip2_giant_text() -> SigLIP2TextConfig:
    """The text encoder of ``google/siglip2-giant-opt-patch16-{256,384}`` (see module docstring)."""
    return SigLIP2TextConfig()


def tiny_text(**changes) -> SigLIP2TextConfig:
    """A CPU-test tower: 2 layers, hidden 64 (4 heads of 16), a 200-id vocabulary (not a multiple
    of 128, so padding is exercised), context 16, head 64 → 48."""
    base = SigLIP2TextConfig(num_layers=2, hidden_size=64, ffn_hidden_size=96,
                             num_attention_heads=4, projection_size=48, vocab_size=200,
                             max_position_embeddings=16)
    return replace(base, **changes)


TEXT_PRESETS = {"siglip2_giant_text": siglip2_giant_text, "tiny_text": tiny_text}


def text_preset(name: str) -> SigLIP2TextConfig:
    if name not in TEXT_PRESETS:
        raise ValueError(f"unknown text preset {name!r}; choose one of {sorted(TEXT_PRESETS)}")
    return TEXT_PRESETS[name]()
