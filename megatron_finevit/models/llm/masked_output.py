"""Logits only where the loss is: the output layer and cross-entropy on supervised tokens alone.

In Stage III and SFT most positions carry no loss — image placeholders, prompts, padding — yet
``GPTModel`` projects every position onto the whole vocabulary (151,936 rows for Qwen3): at
width 2,048 that is 0.6 GFLOP per token, ~18% of Qwen3-1.7B's forward, spent on logits nobody
reads. ``masked_token_loss`` is a megatron ``output_processor`` (``GPTModel.forward(...,
output_processor=)``, called on the last pipeline stage with the final hidden states): it keeps
the rows whose ``loss_mask`` is set, runs the (vocab-parallel) output layer and megatron's
cross-entropy on those rows only, and scatters the losses back to ``[b, s]`` (0 elsewhere) — the
same output as ``GPTModel(labels=...)`` at the supervised positions. ``selected_logits``
returns the logits of chosen rows instead (greedy decoding reads one row per request).

Sequence parallelism: the hidden states arrive split over TP along the sequence; they are
gathered first (each rank needs every selected row, as the vocabulary is split over TP) with a
backward that keeps this rank's slice, and the output layer runs without its own sequence-
parallel gather (its backward all-reduces the input gradient over TP instead).
"""

from __future__ import annotations

import torch


def _selected_logits(hidden_states: torch.Tensor, output_layer, output_weight,
                     selected: torch.Tensor) -> torch.Tensor:
    """Logits ``[n, 1, vocab / TP]`` of the rows ``selected`` (bool ``[s, b]``) of
    ``hidden_states`` ``[s (/ TP under SP), b, h]``, in (s, b) order."""
    from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

    sequence_parallel = output_layer.sequence_parallel
    if sequence_parallel:
        hidden_states = gather_from_sequence_parallel_region(
            hidden_states, tensor_parallel_output_grad=False)  # [s, b, h]
    rows = hidden_states[selected][:, None]  # [n, 1, h]
    output_layer.sequence_parallel = False
    try:
        logits, _ = output_layer(rows, weight=output_weight)
    finally:
        output_layer.sequence_parallel = sequence_parallel
    return logits


def masked_token_loss(*, hidden_states: torch.Tensor, output_layer, output_weight,
                      labels: torch.Tensor, loss_mask: torch.Tensor,
                      compute_language_model_loss, scale_logits, **_) -> torch.Tensor:
    """``hidden_states`` ``[s (/ TP under SP), b, h]``, ``labels`` / ``loss_mask`` ``[b, s]`` ->
    per-token loss ``[b, s]``, computed where ``loss_mask`` is non-zero and 0 elsewhere."""
    selected = loss_mask.transpose(0, 1) != 0  # [s, b]
    logits = scale_logits(_selected_logits(hidden_states, output_layer, output_weight, selected))
    token_loss = compute_language_model_loss(
        labels.transpose(0, 1)[selected][None], logits)  # [1, n]
    loss = torch.zeros(selected.shape, dtype=token_loss.dtype, device=token_loss.device)
    loss = loss.masked_scatter(selected, token_loss[0])  # [s, b]
    return loss.transpose(0, 1)  # [b, s]


def selected_logits(*, hidden_states: torch.Tensor, output_layer, output_weight,
                    loss_mask: torch.Tensor, scale_logits, **_) -> torch.Tensor:
    """The (vocab-parallel) logits ``[1, n, vocab / TP]`` at the ``n`` positions where
    ``loss_mask`` ``[b, s]`` is non-zero, in (s, b) order — what greedy decoding reads."""
    selected = loss_mask.transpose(0, 1) != 0
    return scale_logits(_selected_logits(hidden_states, output_layer, output_weight,
                                         selected)).transpose(0, 1)
