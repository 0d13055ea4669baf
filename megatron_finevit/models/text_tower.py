"""The SigLIP2 text tower on megatron-core layers (FineViT Stage II's text encoder).

ids ``[b, s]`` -> token embedding (vocab-parallel) + learned absolute position embedding ->
megatron ``TransformerBlock`` (pre-norm LayerNorm, bidirectional attention over the whole row,
MLP fc1 -> GELU-tanh -> fc2, biases everywhere) -> final LayerNorm -> the **last** position ->
linear head -> ``[b, projection_size]``.

Like transformers' ``Siglip2TextModel`` (and big_vision's text transformer) the tower attends to
every position, padding included, with no mask, and pools the last position: rows are padded to
the full context length, so that position is always a padding token whose state summarises the
row. Inputs must therefore be padded to the context the tower was trained at (64, then 256 after
``extend_context``); ``data/tokenizers.SentencePieceTokenizer`` produces such rows.

Context extension (64 -> 256, ``extend_context``, ``stretch_position_embeddings``)
-----------------------------------------------------------------------------------
Knowledge-preserving stretching, as Long-CLIP does for CLIP (arXiv 2403.15378): the first
``keep`` position rows — the well-trained ones every caption uses — are copied unchanged; the
remaining ``n - keep`` rows are linearly interpolated onto the remaining ``new_len - keep``
positions with both ends aligned, i.e. new position ``keep + j`` reads old coordinate
``keep + j · (n - 1 - keep) / (new_len - 1 - keep)``. Long-CLIP keeps 20 of CLIP's 77 rows and
stretches the tail 4×; aligning the ends additionally keeps the **last** row exact, and the last
position is the one SigLIP pools, so the pooled token keeps the position embedding it was trained
with. ``keep`` defaults to 20.

Freezing (``set_trainable``)
----------------------------
Stage II trains the tower frozen first, then unfrozen from a configured step
(``text_tower_trainable(step, unfreeze_step)``). megatron's DDP allocates gradient buffers, and
its optimiser its groups, only for parameters that require gradients *when they are built*, so a
trainer must: (1) build, wrap and create the optimiser with the tower trainable; (2) give the
tower its own optimiser group — every tower parameter carries ``is_text_tower = True``, so
``ParamKey(attr=TEXT_TOWER_PARAM_ATTR)`` selects them for ``optimizer_overrides``; (3) while
frozen, call ``set_trainable(False)`` (no gradient is computed through the tower: its grad buffer
stays zero) **and** set that group's learning rate to 0 (so decoupled weight decay and Adam's
running moments cannot move the weights); (4) at ``unfreeze_step`` call ``set_trainable(True)``
and restore the group's learning rate. With a plain torch optimiser, (3)'s ``requires_grad``
alone suffices: parameters whose ``.grad`` is None are skipped.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from megatron.core import tensor_parallel
from megatron.core.enums import ModelType
from megatron.core.models.common.embeddings.language_model_embedding import LanguageModelEmbedding
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_block import TransformerBlock

from megatron_finevit.config.text import SigLIP2TextConfig
from megatron_finevit.models.specs import transformer_block_spec

TEXT_TOWER_PARAM_ATTR = "is_text_tower"
DEFAULT_KEEP_POSITIONS = 20


def stretch_position_embeddings(table: torch.Tensor, new_len: int,
                                keep: int = DEFAULT_KEEP_POSITIONS) -> torch.Tensor:
    """``[n, h]`` position table -> ``[new_len, h]``: rows ``< keep`` copied, the tail linearly
    interpolated with both ends aligned (see the module docstring). Computed in at least float32,
    returned in the table's dtype."""
    n = table.shape[0]
    if new_len < n:
        raise ValueError(f"cannot stretch {n} positions down to {new_len}")
    if not 0 <= keep <= n - 2:
        raise ValueError(f"keep={keep} must be in [0, {n - 2}] so that at least two rows of the "
                         f"{n}-row table are interpolated")
    compute_dtype = torch.promote_types(table.dtype, torch.float32)
    tail = table[keep:].to(compute_dtype)                         # [m, h]
    coords = torch.linspace(0, tail.shape[0] - 1, new_len - keep, device=table.device,
                            dtype=compute_dtype)
    low = coords.floor().long().clamp(max=tail.shape[0] - 2)
    frac = (coords - low).unsqueeze(1)
    stretched = tail[low] * (1 - frac) + tail[low + 1] * frac     # [new_len - keep, h]
    return torch.cat([table[:keep], stretched.to(table.dtype)])


def text_tower_trainable(step: int, unfreeze_step: int | None) -> bool:
    """Whether the tower trains at ``step``: frozen before ``unfreeze_step``; None = never
    frozen."""
    return unfreeze_step is None or step >= unfreeze_step


class SigLIPTextTower(MegatronModule):
    """SigLIP2 text encoder (see the module docstring).

    Args:
        text: architecture; ``config``: its megatron ``TransformerConfig``
            (``text.to_transformer_config(...)``, which decides TP / SP and dtype).

    The whole tower lives on one pipeline stage (it is small next to the ViT).
    Checkpoint keys: ``embedding.{word,position}_embeddings.weight``, ``decoder.layers.*``
    (TE names for the norms, so ``local`` and ``te`` checkpoints agree),
    ``decoder.final_layernorm.*``, ``head.*``.
    """

    def __init__(self, text: SigLIP2TextConfig, config):
        super().__init__(config=config)
        self.text = text
        # megatron's schedules and finalize_model_grads read these
        self.model_type = ModelType.encoder_or_decoder
        self.share_embeddings_and_output_weights = False
        self.embedding = LanguageModelEmbedding(
            config, vocab_size=text.padded_vocab_size,
            max_sequence_length=text.max_position_embeddings,
            position_embedding_type="learned_absolute")
        spec = transformer_block_spec(config, text.spec_backend, AttnMaskType.no_mask)
        self.decoder = TransformerBlock(config=config, spec=spec, pre_process=True,
                                        post_process=True)
        # Replicated over TP (1152 x 1536 for giant): every TP rank pools the same token.
        self.head = torch.nn.Linear(text.hidden_size, text.projection_size,
                                    dtype=config.params_dtype)
        if config.perform_initialization:
            config.init_method(self.head.weight)
            with torch.no_grad():
                self.head.bias.zero_()
        self._tag_parameters()

    @property
    def context_length(self) -> int:
        return self.embedding.position_embeddings.num_embeddings

    def _tag_parameters(self) -> None:
        for param in self.parameters():
            setattr(param, TEXT_TOWER_PARAM_ATTR, True)

    def set_input_tensor(self, input_tensor) -> None:
        """Part of megatron's module interface; the tower is never split over pipeline stages."""
        if input_tensor is not None and not (isinstance(input_tensor, (list, tuple))
                                             and all(t is None for t in input_tensor)):
            raise RuntimeError("SigLIPTextTower is not pipeline-split: it takes no input tensor")

    def encode(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Last hidden states after the final LayerNorm, ``[b, s, hidden]`` (whole sequence on
        every TP rank; under sequence parallelism it is gathered)."""
        b, s = input_ids.shape
        if s > self.context_length:
            raise ValueError(f"text rows of {s} tokens exceed the tower's context of "
                             f"{self.context_length} (extend_context first)")
        tp = self.config.tensor_model_parallel_size
        if self.config.sequence_parallel and s % tp:
            raise ValueError(f"{s} tokens do not split over {tp} sequence-parallel ranks")
        positions = torch.arange(s, device=input_ids.device).expand(b, s)
        hidden = self.embedding(input_ids, positions)              # [s(/tp), b, h]
        hidden = self.decoder(hidden, attention_mask=None)         # [s(/tp), b, h]
        if self.config.sequence_parallel:
            # Everything after this is replicated over TP, so the gather's backward is a split.
            hidden = tensor_parallel.gather_from_sequence_parallel_region(
                hidden, tensor_parallel_output_grad=False)
        return hidden.transpose(0, 1)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Text embeddings ``[b, projection_size]`` of padded id rows ``[b, s]`` (int64)."""
        return self.head(self.encode(input_ids)[:, -1])

    @torch.no_grad()
    def extend_context(self, new_len: int, keep: int = DEFAULT_KEEP_POSITIONS) -> None:
        """Stretch the position table to ``new_len`` rows (module docstring). Replaces the
        position-embedding parameter: call it before DDP wrapping and optimiser creation."""
        old = self.embedding.position_embeddings
        table = stretch_position_embeddings(old.weight, new_len, keep)
        new = torch.nn.Embedding(new_len, table.shape[1], device=table.device, dtype=table.dtype)
        new.weight.copy_(table)
        new.weight.requires_grad_(old.weight.requires_grad)
        setattr(new.weight, TEXT_TOWER_PARAM_ATTR, True)
        self.embedding.position_embeddings = new
        self.embedding.max_sequence_length = new_len
        self.text = replace(self.text, max_position_embeddings=new_len)

    def set_trainable(self, trainable: bool) -> None:
        """Freeze (False) or unfreeze (True) every tower parameter (module docstring: what a
        trainer with megatron's optimiser must do besides)."""
        for param in self.parameters():
            param.requires_grad_(trainable)


def load_tower_weights(tower: SigLIPTextTower, ckpt_dir: str) -> int:
    """Initialise ``tower`` from a megatron checkpoint of a text tower (what
    ``tools/convert_checkpoint.py hf-to-mcore --model siglip2-text`` writes), at any TP.

    A stored position table shorter than the tower's (SigLIP2's 64 rows into a tower allocated
    for the 256 of a context schedule) fills the first rows; the rest are overwritten when the
    schedule stretches the context. Returns the number of stored position rows.
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    from megatron_finevit.convert.mcore_io import MegatronCheckpointReader

    template = tower.sharded_state_dict()
    key = "embedding.position_embeddings.weight"
    table = tower.embedding.position_embeddings.weight
    rows = MegatronCheckpointReader(ckpt_dir).shape(template[key].key)[0]
    if rows > table.shape[0]:
        raise ValueError(f"{ckpt_dir} has {rows} text positions, more than the tower's "
                         f"{table.shape[0]}: raise the context (max_position_embeddings)")
    template[key] = ShardedTensor.from_rank_offsets(
        template[key].key, torch.empty(rows, table.shape[1], dtype=table.dtype),
        replica_id=template[key].replica_id)
    loaded = dist_checkpointing.load(template, ckpt_dir)
    positions = loaded.pop(key)
    missing, unexpected = tower.load_state_dict(loaded, strict=False)
    if unexpected or set(missing) != {key}:
        raise RuntimeError(f"{ckpt_dir} does not hold this text tower: missing {missing}, "
                           f"unexpected {unexpected}")
    with torch.no_grad():
        table[:rows].copy_(positions)
    return rows


def build_text_tower(text: SigLIP2TextConfig, config) -> SigLIPTextTower:
    """The tower for ``text`` with megatron config ``config`` (checks they describe one model)."""
    pairs = {"num_layers": text.num_layers, "hidden_size": text.hidden_size,
             "ffn_hidden_size": text.ffn_hidden_size,
             "num_attention_heads": text.num_attention_heads, "kv_channels": text.head_dim}
    wrong = {k: (getattr(config, k), v) for k, v in pairs.items() if getattr(config, k) != v}
    if wrong:
        raise ValueError("TransformerConfig does not match the text config: "
                         + ", ".join(f"{k}: {a} != {b}" for k, (a, b) in wrong.items()))
    plain_mlp = config.add_bias_linear and not config.gated_linear_unit
    if config.normalization != "LayerNorm" or not plain_mlp:
        raise ValueError("the SigLIP2 text tower needs LayerNorm, biases and a plain MLP: build "
                         "the TransformerConfig with SigLIP2TextConfig.to_transformer_config()")
    return SigLIPTextTower(text, config)
