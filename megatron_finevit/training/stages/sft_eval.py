"""SFT evaluation on held-out VQA conversations: short answers by greedy decoding, scored against
the majority-answer baseline.

Questions. The held-out set is a conversation shard directory (indexed) whose samples carry
``vqa_kinds``, the kind of each assistant turn (``tools/make_synthetic_vqa.py --split eval``).
The first ``max_samples`` samples with an image (index order) are dealt to the data-parallel
ranks (``heldout``: dealing, skips, answers). Every user turn of a sample is one
question about its (first) image and the assistant turn after it the reference answer; the
questions are independent of each other, so each is its own request: the prompt is the run's
chat template's ``encode_prompt`` of the question with the image block, no history.

Answers: greedy decoding at the run's layout (``heldout.greedy_answers``).

Metrics (``evaluation.vqa``): every rank gathers all ranks' (kind, answer, reference) triples and
scores them, so each rank returns the same dict and the majority baselines are taken over the
whole evaluated set. Keys: ``vqa_acc``, ``vqa_baseline``, ``vqa_n`` and ``vqa_acc_<kind>``,
``vqa_baseline_<kind>``, ``vqa_n_<kind>`` per kind asked, and ``vqa_skipped``: samples that
could not be read or decoded, whose JSON is not a VQA conversation (``BadSampleCounter``
reasons, as in the training loader) or whose questions do not fit the pack budgets.
"""

from __future__ import annotations

from megatron_finevit.data.bad_samples import BadSampleError
from megatron_finevit.data.tasks.conversation import messages_from_meta
from megatron_finevit.evaluation.vqa import vqa_metrics
from megatron_finevit.training.stages.heldout import (gather_over_data_parallel, greedy_answers,
                                                      held_out_requests)


def vqa_questions(meta: dict) -> list[tuple[str, str, str]]:
    """``(kind, question, reference answer)`` per assistant turn of a VQA conversation sample.
    Raises BadSampleError ("invalid_meta", or the conversation rules') for anything else."""
    messages = messages_from_meta(meta)
    dialogue = [m for m in messages if m.role != "system"]
    kinds = meta.get("vqa_kinds")
    if (not isinstance(kinds, list) or not all(isinstance(k, str) for k in kinds)
            or len(kinds) != len(dialogue) // 2):
        raise BadSampleError("invalid_meta", f"vqa_kinds {kinds!r}: want one kind (str) per "
                                             f"assistant turn ({len(dialogue) // 2})")
    return [(kind, user.text.strip(), assistant.text.strip())
            for kind, user, assistant in zip(kinds, dialogue[::2], dialogue[1::2])]


def evaluate_vqa(stage, model_chunks: list, data_dir: str,
                 max_samples: int | None = None) -> dict[str, float]:
    """VQA metrics of ``model_chunks`` (this rank's FineViT-VL chunk, possibly wrapped) on the
    held-out conversation shards ``data_dir``, the same dict on every rank (module doc).

    ``stage`` provides ``template``, ``vl``, ``norm``, ``data_config`` (``policy``,
    ``llm_tokens``, ``vit_tokens``) and ``cfg`` (``eval_max_new_tokens``, default 24;
    ``data.use_draft``, default False); megatron's parallel state is initialised.
    """
    import numpy as np

    from megatron_finevit.data.index import load_index
    from megatron_finevit.data.tasks.multimodal import image_llm_tokens

    template = stage.template

    def ask(key, meta, images):
        # every question is about the sample's first image, asked alone
        return [((kind, truth), template.encode_prompt(question, image_llm_tokens(images[0])),
                 images[0]) for kind, question, truth in vqa_questions(meta)]

    rows = np.flatnonzero(load_index(data_dir).num_images > 0)[:max_samples]  # None: all
    requests, questions, skipped = held_out_requests(stage, data_dir, rows, ask, "vqa eval")
    answers = greedy_answers(stage, model_chunks, requests)
    shares = gather_over_data_parallel(
        ([(kind, text, truth) for (kind, truth), text in zip(questions, answers)], skipped))
    answers = [answer for share, _ in shares for answer in share]
    scores = vqa_metrics([kind for kind, _, _ in answers], [text for _, text, _ in answers],
                         [truth for _, _, truth in answers])
    results = {f"vqa_{key}": float(value) for key, value in scores.items()}
    results["vqa_skipped"] = float(sum(count for _, count in shares))
    return results
