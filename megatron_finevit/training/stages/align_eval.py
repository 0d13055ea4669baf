"""Stage III evaluation on held-out images: region QA answered by greedy decoding.

Questions. The first ``max_images`` samples of the split's index (index order) are dealt to the
data-parallel ranks (``heldout``: dealing, skips, answers). Per image, at most one question of
each kind ``caption_to_bbox`` (grounding), ``bbox_to_caption`` and ``bbox_to_ocr``: the
annotation drawn by the training draw's generator (``region_qa.sample_rng`` of the run's seed and
the sample key), the kind's first paraphrase so every evaluation asks the same way, boxes encoded
by the run's ``BoxCodec``, the prompt rendered by the run's chat template (``encode_prompt``: the
image block, the question, the assistant header). Each question is its own request (the image's
tokens repeat), so no answer is visible to another question.

Answers: greedy decoding at the run's layout (``heldout.greedy_answers``).

Metrics (``evaluation.region_qa``): every rank gathers all ranks' answers (a few strings and boxes
per image) and scores them, so each rank returns the same dict and the baselines (mean box, most
frequent answer) are taken over the whole evaluated set. Keys: ``grounding_{acc, baseline,
parse_failures, n}``, ``region_caption_{em, f1, baseline_em, baseline_f1, n}``, ``ocr_{…}`` the
same, and ``eval_skipped`` — images that could not be read or decoded (``BadSampleCounter``
reasons, as in the training loader) or whose questions do not fit the pack budgets. A kind
without any question reports only its ``_n`` (0).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

from megatron_finevit.data.tasks.boxes import Box, BoxCodec
from megatron_finevit.data.tasks.region_qa import (BBOX_TO_CAPTION, BBOX_TO_OCR, CAPTION_TO_BBOX,
                                                   PARAPHRASES, annotation_pools,
                                                   question_and_answer, sample_rng)
from megatron_finevit.evaluation.region_qa import GroundingItem, grounding_metrics, text_metrics
from megatron_finevit.training.stages.heldout import (gather_over_data_parallel, greedy_answers,
                                                      held_out_requests)

EVAL_KINDS = (CAPTION_TO_BBOX, BBOX_TO_CAPTION, BBOX_TO_OCR)
EVAL_DRAW_STEP = 0  # the draw's "epoch": held-out images are never drawn for training
METRIC_PREFIX = {CAPTION_TO_BBOX: "grounding", BBOX_TO_CAPTION: "region_caption",
                 BBOX_TO_OCR: "ocr"}


@dataclasses.dataclass(frozen=True)
class EvalQuestion:
    """One question about an image: its kind, text, ground-truth answer text and, for
    grounding, the target box (codec integers)."""

    kind: str
    question: str
    truth: str
    box: Box | None = None


@dataclasses.dataclass(frozen=True)
class EvalAnswer:
    """A question's ground truth and the model's answer, with the resized image size ``(H, W)``
    its boxes refer to (what the ranks exchange)."""

    kind: str
    truth: str
    box: Box | None
    resized_hw: tuple[int, int]
    prediction: str


def eval_questions(meta: dict, *, original_hw: tuple[int, int], resized_hw: tuple[int, int],
                   codec: BoxCodec, seed: int, key: str,
                   kinds: Sequence[str] = EVAL_KINDS) -> list[EvalQuestion]:
    """At most one question per kind of ``kinds`` (a subset of ``EVAL_KINDS``) for one image, in
    ``EVAL_KINDS`` order (module doc); ``meta`` is the validated sample JSON (boxes in original
    pixels). The draw is the same whichever kinds are asked."""
    pools = annotation_pools(meta, codec, original_hw, resized_hw)
    rng = sample_rng(seed, key, EVAL_DRAW_STEP)
    questions = []
    for kind in EVAL_KINDS:
        if pools[kind]:
            item = pools[kind][int(rng.integers(len(pools[kind])))]  # drawn even if not asked
            if kind not in kinds:
                continue
            question, truth = question_and_answer(kind, PARAPHRASES[kind][0], item, codec)
            questions.append(EvalQuestion(kind, question, truth,
                                          item.box if kind == CAPTION_TO_BBOX else None))
    return questions


def align_metrics(answers: Sequence[EvalAnswer], codec: BoxCodec,
                  skipped: int) -> dict[str, float]:
    """The evaluation's dict (module doc) from every rank's answers."""
    def of(kind):
        return [a for a in answers if a.kind == kind]

    results = {"grounding_" + k: v for k, v in grounding_metrics(
        [GroundingItem(a.box, a.resized_hw, a.prediction) for a in of(CAPTION_TO_BBOX)],
        codec).items()}
    for kind in (BBOX_TO_CAPTION, BBOX_TO_OCR):
        selected = of(kind)
        results.update({f"{METRIC_PREFIX[kind]}_{k}": v for k, v in text_metrics(
            [a.prediction for a in selected], [a.truth for a in selected]).items()})
    results["eval_skipped"] = skipped
    return {k: float(v) for k, v in results.items()}


def evaluate_align(stage, model_chunks: list, eval_dir: str,
                   max_images: int | None = None) -> dict[str, float]:
    """Region-QA metrics of ``model_chunks`` (this rank's FineViT-VL chunk, possibly wrapped) on
    the held-out shards ``eval_dir`` (indexed), the same dict on every rank (module doc).

    ``stage`` provides ``data_config`` (``RegionQAConfig``: policy, seed, budgets), ``template``,
    ``codec``, ``vl``, ``norm`` and ``cfg`` (``eval_max_new_tokens``, default 24;
    ``data.use_draft``, default False); megatron's parallel state is initialised.
    """
    from megatron_finevit.data.index import load_index
    from megatron_finevit.data.tasks.multimodal import image_llm_tokens

    config, template = stage.data_config, stage.template

    def ask(key, meta, images):
        image = images[0]
        hw = tuple(image.shape[1:])
        asked = eval_questions(meta, original_hw=(meta["height"], meta["width"]), resized_hw=hw,
                               codec=stage.codec, seed=config.seed, key=key,
                               kinds=getattr(stage.cfg, "eval_kinds", EVAL_KINDS))
        return [((q, hw), template.encode_prompt(q.question, image_llm_tokens(image)), image)
                for q in asked]

    count = len(load_index(eval_dir))
    rows = range(min(count, count if max_images is None else max_images))
    requests, questions, skipped = held_out_requests(stage, eval_dir, rows, ask, "align eval")
    answers = greedy_answers(stage, model_chunks, requests)
    shares = gather_over_data_parallel(
        ([EvalAnswer(q.kind, q.truth, q.box, hw, text)
          for (q, hw), text in zip(questions, answers)], skipped))
    return align_metrics([a for answers, _ in shares for a in answers], stage.codec,
                         sum(count for _, count in shares))
