"""Stage III evaluation on held-out images: region QA answered by greedy decoding.

Questions. The first ``max_images`` samples of the split's index (index order) are dealt to the
data-parallel ranks round-robin (disjoint shares; every rank of a model-parallel group takes the
same share and decodes the same images, so a broken image is skipped on every pipeline stage
alike). Per image, at most one question of each kind ``caption_to_bbox`` (grounding),
``bbox_to_caption`` and ``bbox_to_ocr``: the annotation drawn by the training draw's generator
(``region_qa.sample_rng`` of the run's seed and the sample key), the kind's first paraphrase so
every evaluation asks the same way, boxes encoded by the run's ``BoxCodec``, the prompt rendered
by the run's chat template (``encode_prompt``: the image block, the question, the assistant
header). Each question is its own request (the image's tokens repeat), so no answer is visible
to another question.

Answers: ``evaluation.generation.greedy_generate`` at the run's layout, packs of the training
budgets (``llm_tokens`` / ``vit_tokens``), ``eval_max_new_tokens`` at most, stopping at
``<|im_end|>`` / ``<|endoftext|>``; the text is decoded and stripped.

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
from megatron_finevit.data.tasks.chat import IM_END, PAD_TOKEN
from megatron_finevit.data.tasks.region_qa import (BBOX_TO_CAPTION, BBOX_TO_OCR, CAPTION_TO_BBOX,
                                                   PARAPHRASES, annotation_pools,
                                                   question_and_answer, sample_rng)
from megatron_finevit.evaluation.region_qa import GroundingItem, grounding_metrics, text_metrics

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
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_finevit.evaluation.generation import greedy_generate

    requests, questions, hws, skipped = _requests(stage, eval_dir, max_images)
    template = stage.template
    ids = greedy_generate(
        model_chunks, requests, max_new_tokens=_max_new_tokens(stage),
        seq_length=stage.data_config.llm_tokens, vit_tokens=stage.data_config.vit_tokens,
        vocab_size=stage.vl.llm.vocab_size, pad_id=template.pad_id,
        image_token_id=stage.vl.image_token_id,
        stop_ids=(template.tokenizer.token_id(IM_END), template.tokenizer.token_id(PAD_TOKEN)))
    local = ([EvalAnswer(q.kind, q.truth, q.box, hw, template.tokenizer.decode(out).strip())
              for q, hw, out in zip(questions, hws, ids)], skipped)
    shares = [local]
    if ps.get_data_parallel_world_size() > 1:
        shares = [None] * ps.get_data_parallel_world_size()
        dist.all_gather_object(shares, local, group=ps.get_data_parallel_group())
    return align_metrics([a for answers, _ in shares for a in answers], stage.codec,
                         sum(count for _, count in shares))


def _max_new_tokens(stage) -> int:
    return int(getattr(stage.cfg, "eval_max_new_tokens", 24))


def _requests(stage, eval_dir: str, max_images: int | None):
    """This data-parallel rank's generation requests, their questions and resized sizes (one per
    request), and the number of images skipped."""
    from megatron.core import parallel_state as ps

    from megatron_finevit.data.bad_samples import BadSampleCounter, BadSampleError
    from megatron_finevit.data.decode_pil import decode_pil
    from megatron_finevit.data.index import load_index
    from megatron_finevit.data.loader import SampleReader
    from megatron_finevit.data.tasks.multimodal import image_llm_tokens
    from megatron_finevit.evaluation.generation import GenerationRequest

    config, template = stage.data_config, stage.template
    use_draft = bool(getattr(getattr(stage.cfg, "data", None), "use_draft", False))
    max_new_tokens = _max_new_tokens(stage)
    index = load_index(eval_dir)
    reader = SampleReader(index)
    counter = BadSampleCounter(name=f"align eval {eval_dir}")
    selected = range(min(len(index), len(index) if max_images is None else max_images))
    requests, questions, hws = [], [], []
    try:
        for sample in selected[ps.get_data_parallel_rank()::ps.get_data_parallel_world_size()]:
            key = str(index.key[sample])
            try:
                image_bytes, meta = reader.read(sample)
                image = decode_pil(image_bytes, config.policy, stage.norm, use_draft=use_draft)
            except BadSampleError as err:
                counter.skip_error(err, member=key)
                continue
            hw = tuple(image.shape[1:])
            asked = eval_questions(meta, original_hw=(meta["height"], meta["width"]),
                                   resized_hw=hw, codec=stage.codec, seed=config.seed, key=key,
                                   kinds=getattr(stage.cfg, "eval_kinds", EVAL_KINDS))
            image_requests = [GenerationRequest(image, template.encode_prompt(
                q.question, image_llm_tokens(image))) for q in asked]
            if not all(r.fits(max_new_tokens, config.llm_tokens, config.vit_tokens)
                       for r in image_requests):
                counter.skip("oversize", member=key, detail="a question does not fit a pack")
                continue
            counter.ok()
            requests += image_requests
            questions += asked
            hws += [hw] * len(asked)
    finally:
        reader.close()
    return requests, questions, hws, counter.num_skipped
