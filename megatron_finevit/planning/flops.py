"""Model FLOPs of forward + backward per module: the one count behind the trainer's MFU (each
stage's ``work``) and the planning tools.

Conventions (megatron's ``num_floating_point_operations``):

* Matmuls only, ``2·m·k·n`` per ``[m, k] × [k, n]`` product; norms, softmax, RoPE, activations,
  embedding lookups and the loss are left out.
* Backward: every matmul whose weight trains costs one more forward for its weight gradient, and
  one more for its input gradient when anything before it trains (the patch embedding, reading
  pixels, needs none). Attention scores have no weights: a gradient through them costs 2×
  their forward (``dQ, dK`` and ``dP, dV``). So a layer inside a trained stack costs 3× its
  forward; a frozen LLM behind a trained projector costs 2× in its linears (3× in its attention
  scores); a frozen encoder with nothing before it costs 1×.
* Model FLOPs, not hardware FLOPs: no activation recomputation, and not the recomputation of the
  scores that flash attention's backward does.
* Attention per segment (one image in the ViT, one sample in the LLM — packing never mixes
  them): forward ``QKᵀ`` and ``P·V`` are ``4·n²·width`` per layer (``width`` = heads × head dim)
  for the bidirectional ViT; causal LLM segments count half, ``2·n²·width``, megatron's
  convention ("causal mask: only half of the mask is non-zero") — PaLM's MFU counts the full
  square instead, so our LLM attention term is half of PaLM's.
* Real tokens only: callers pass the lengths of real images and samples, not a pack's padding
  (megatron's THD convention), so MFU does not rise with padding.
* The LLM's output layer spans the padded vocabulary (the rows the GEMM computes), over the
  positions it runs at: every token by default; in training only the supervised ones
  (``output_rows``), as ``models/llm/masked_output`` computes no other logits — counting every
  position had the quick start's SFT log MFU above 160%.

``vlm_flops`` is checked against ``torch.utils.flop_counter.FlopCounterMode`` on the megatron
FineViT-VL (``tests/planning/test_flops.py``); ``transformer_flops`` is the coarser
``6 · params · tokens`` + attention count the FineViT stages (I, II) and the text tower use
(within 0.1% of the per-module count on the paper encoder). The per-module counts
(``vit_tower_flops``, ``text_tower_flops``, ``map_head_flops``, ``llm_tower_flops``) feed
``tools/plan.py``; ``planning.selfcheck`` checks their forward against the counter on the built
tiny models. ``encoder_forward_flops`` counts a frozen teacher (Stage I's DINOv3; not part of the
trained model, so not in MFU).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from megatron_finevit.config.llm import Qwen3Config
from megatron_finevit.config.text import SigLIP2TextConfig
from megatron_finevit.config.vit import FineViTConfig
from megatron_finevit.config.vlm import FineViTVLConfig


def transformer_flops(params: int, lengths: list[int], num_layers: int, hidden: int) -> float:
    """Forward + backward matmul FLOPs of a transformer over independent sequences: ``3×`` the
    forward ``2 · params · tokens`` plus ``4 · n² · hidden`` per layer and sequence (bidirectional
    attention, each sequence attending to itself)."""
    tokens = sum(lengths)
    attention = sum(4 * n * n * hidden * num_layers for n in lengths)
    return 3.0 * (2.0 * params * tokens + attention)


def linear_flops(tokens: int, in_features: int, out_features: int) -> float:
    """Forward FLOPs of a linear layer over ``tokens`` rows."""
    return 2.0 * tokens * in_features * out_features


def attention_score_flops(lengths: Sequence[int], width: int, causal: bool) -> float:
    """Forward FLOPs of ``QKᵀ`` and ``P·V`` over independent segments of ``lengths`` (one layer;
    ``width`` = query heads × head dim; causal: half the square, see the module docstring)."""
    return (2.0 if causal else 4.0) * width * sum(n * n for n in lengths)


@dataclass(frozen=True)
class TowerFlops:
    """Forward FLOPs of one module, split by what its backward costs: ``input_weights``, the
    matmuls reading the module's input (no input gradient unless something before trains);
    ``weights``, the other weight matmuls; ``scores``, attention scores (no weights)."""

    input_weights: float
    weights: float
    scores: float

    @property
    def forward(self) -> float:
        return self.input_weights + self.weights + self.scores

    def forward_backward(self, trainable: bool, grad_into: bool) -> float:
        """Forward + backward FLOPs: ``trainable``, its weights train; ``grad_into``, something
        before it trains (its input needs a gradient)."""
        grad_inside = trainable or grad_into  # a gradient flows through its inner activations
        weight_grads = (self.input_weights + self.weights) if trainable else 0.0
        input_grads = (self.input_weights * grad_into + self.weights * grad_inside
                       + 2.0 * self.scores * grad_inside)
        return self.forward + weight_grads + input_grads


def vit_tower_flops(vit: FineViTConfig, image_patches: Sequence[int]) -> TowerFlops:
    """The FineViT encoder over images of ``image_patches`` patches each: the patch embedding,
    then per layer QKV, the attention scores per image, the output projection and the SwiGLU MLP."""
    h, f, tokens = vit.hidden_size, vit.ffn_hidden_size, sum(image_patches)
    per_layer = (linear_flops(tokens, h, 3 * h) + linear_flops(tokens, h, h)
                 + linear_flops(tokens, h, 2 * f) + linear_flops(tokens, f, h))
    return TowerFlops(
        input_weights=linear_flops(tokens, vit.patch_dim, h),
        weights=vit.num_layers * per_layer,
        scores=vit.num_layers * attention_score_flops(image_patches, h, causal=False))


def projector_flops(vl_config: FineViTVLConfig, image_patches: Sequence[int]) -> TowerFlops:
    """The 2×2 merge projector: ``Linear(4h, 4h)`` then ``Linear(4h, llm hidden)`` per window.
    Its first linear reads the output of its own (weighted) norm, so it needs an input gradient
    whenever the projector trains: ``input_weights`` is 0."""
    window = vl_config.vit.merge_size ** 2
    merged, windows = window * vl_config.vit.hidden_size, sum(image_patches) // window
    return TowerFlops(input_weights=0.0,
                      weights=(linear_flops(windows, merged, merged)
                               + linear_flops(windows, merged, vl_config.llm.hidden_size)),
                      scores=0.0)


def llm_tower_flops(llm: Qwen3Config, lengths: Sequence[int],
                    output_rows: int | None = None) -> TowerFlops:
    """The Qwen3 decoder over samples of ``lengths`` tokens: per layer the GQA projections (q over
    all heads, k and v over the query groups, o back to the hidden size), causal attention scores
    per sample and the SwiGLU MLP; then the output layer over the padded vocabulary at
    ``output_rows`` positions (default: every token). Its input comes from an embedding lookup
    (no matmul), so ``input_weights`` is 0."""
    h, f, tokens = llm.hidden_size, llm.ffn_hidden_size, sum(lengths)
    output_rows = tokens if output_rows is None else output_rows
    q_width, kv_width = llm.num_attention_heads * llm.head_dim, llm.num_query_groups * llm.head_dim
    per_layer = (linear_flops(tokens, h, q_width + 2 * kv_width) + linear_flops(tokens, q_width, h)
                 + linear_flops(tokens, h, 2 * f) + linear_flops(tokens, f, h))
    return TowerFlops(
        input_weights=0.0,
        weights=llm.num_layers * per_layer + linear_flops(output_rows, h, llm.padded_vocab_size),
        scores=llm.num_layers * attention_score_flops(lengths, q_width, causal=True))


def vlm_flops(vl_config: FineViTVLConfig, image_patches: list[int], llm_lengths: list[int],
              vit_trainable: bool = True, llm_trainable: bool = True,
              projector_trainable: bool = True, output_rows: int | None = None) -> float:
    """Forward + backward FLOPs of one FineViT-VL micro-batch: the ViT over each image's
    ``image_patches`` (attention per image), the merge projector, and the LLM over each sample's
    ``llm_lengths`` tokens (image placeholders included; causal attention per sample), its output
    layer at ``output_rows`` positions (default: all; training passes the supervised ones). Frozen
    modules cost what their position needs (module docstring): a frozen ViT 1× forward, a frozen
    LLM behind a trained projector 2× in its linears."""
    vit = vit_tower_flops(vl_config.vit, image_patches)
    projector = projector_flops(vl_config, image_patches)
    llm = llm_tower_flops(vl_config.llm, llm_lengths, output_rows)
    return (vit.forward_backward(vit_trainable, grad_into=False)
            + projector.forward_backward(projector_trainable, grad_into=vit_trainable)
            + llm.forward_backward(llm_trainable, grad_into=vit_trainable or projector_trainable))


def text_tower_flops(text: SigLIP2TextConfig, rows: int, context: int) -> TowerFlops:
    """The SigLIP2 text tower over ``rows`` padded rows of ``context`` tokens: per layer QKV, the
    bidirectional attention over the whole row (padding included: the tower attends to it), the
    output projection and the GELU MLP; then the head on each row's pooled (last) token. Its input
    is an embedding lookup, so ``input_weights`` is 0."""
    h, f, tokens = text.hidden_size, text.ffn_hidden_size, rows * context
    per_layer = (linear_flops(tokens, h, 3 * h) + linear_flops(tokens, h, h)
                 + linear_flops(tokens, h, f) + linear_flops(tokens, f, h))
    return TowerFlops(
        input_weights=0.0,
        weights=text.num_layers * per_layer + linear_flops(rows, h, text.projection_size),
        scores=text.num_layers * attention_score_flops([context] * rows, h, causal=False))


def map_head_flops(vit: FineViTConfig, projection_size: int, image_patches: Sequence[int],
                   mlp_ratio: int = 4) -> TowerFlops:
    """Stage II's MAP pooling head (``models/heads/map_pool``) over images of ``image_patches``
    tokens: K/V over every token, one probe query (a single row), the probe's score and weighted
    sum per token (``2·N·h`` each, no weights), then per image the output projection, the MLP and
    the projection to the text width. Reads the encoder's output, so ``input_weights`` holds the
    K/V projection."""
    h, tokens, images = vit.hidden_size, sum(image_patches), len(image_patches)
    per_image = (linear_flops(images, h, h) + linear_flops(images, h, mlp_ratio * h)
                 + linear_flops(images, mlp_ratio * h, h) + linear_flops(images, h, projection_size))
    return TowerFlops(input_weights=linear_flops(tokens, h, 2 * h),
                      weights=linear_flops(1, h, h) + per_image,
                      scores=2.0 * linear_flops(tokens, h, 1))


@dataclass(frozen=True)
class EncoderShape:
    """A plain ViT's shapes for counting a frozen teacher (Stage I's DINOv3): ``extra_tokens`` per
    image (class + register tokens), ``gated`` MLP or not, ``patch_dim`` values per patch."""

    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    patch_dim: int
    extra_tokens: int = 0
    gated: bool = False


# DINOv3 ViT-L/16 (dinov3-vitl16-pretrain-lvd1689m): 24 layers, width 1024, MLP 4096, 16-pixel
# patches, a class token and 4 registers; the teacher of examples/stage1_mim.yaml.
DINOV3_VITL16 = EncoderShape(num_layers=24, hidden_size=1024, ffn_hidden_size=4096,
                             patch_dim=3 * 16 * 16, extra_tokens=5)


def encoder_forward_flops(shape: EncoderShape, image_patches: Sequence[int]) -> float:
    """Forward matmul FLOPs of a plain pre-norm ViT (a frozen teacher: forward only) over images
    of ``image_patches`` patches each: patch embedding, then per layer QKV, bidirectional scores
    per image, output projection and MLP."""
    h, f = shape.hidden_size, shape.ffn_hidden_size
    lengths = [n + shape.extra_tokens for n in image_patches]
    tokens = sum(lengths)
    mlp = (3 if shape.gated else 2) * linear_flops(tokens, h, f)
    per_layer = linear_flops(tokens, h, 4 * h) + mlp
    return (linear_flops(sum(image_patches), shape.patch_dim, h)
            + shape.num_layers * (per_layer + attention_score_flops(lengths, h, causal=False)))
