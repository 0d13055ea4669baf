"""SFT evaluation on held-out VQA conversations: short answers by greedy decoding, scored against
the majority-answer baseline.

Questions. The held-out set is a conversation shard directory (indexed) whose samples carry
``vqa_kinds``, the kind of each assistant turn (``tools/make_synthetic_vqa.py --split eval``).
The first ``max_samples`` samples with an image (index order) are dealt to the data-parallel
ranks round-robin (disjoint shares; every rank of a model-parallel group takes the same share, so
a broken image is skipped on every pipeline stage alike). Every user turn of a sample is one
question about its (first) image and the assistant turn after it the reference answer; the
questions are independent of each other, so each is its own request: the prompt is the run's
chat template's ``encode_prompt`` of the question with the image block, no history.

Answers: ``evaluation.generation.greedy_generate`` at the run's layout, packs of the training
budgets (``llm_tokens`` / ``vit_tokens``), ``eval_max_new_tokens`` at most, stopping at
``<|im_end|>`` / ``<|endoftext|>``; the text is decoded and stripped.

Metrics (``evaluation.vqa``): every rank gathers all ranks' (kind, answer, reference) triples and
scores them, so each rank returns the same dict and the majority baselines are taken over the
whole evaluated set. Keys: ``vqa_acc``, ``vqa_baseline``, ``vqa_n`` and ``vqa_acc_<kind>``,
``vqa_baseline_<kind>``, ``vqa_n_<kind>`` per kind asked, and ``vqa_skipped``: samples that
could not be read or decoded, whose JSON is not a VQA conversation (``BadSampleCounter``
reasons, as in the training loader) or whose questions do not fit the pack budgets.
"""

from __future__ import annotations

from megatron_finevit.data.bad_samples import BadSampleError
from megatron_finevit.data.tasks.chat import IM_END, PAD_TOKEN
from megatron_finevit.data.tasks.conversation import messages_from_meta
from megatron_finevit.evaluation.vqa import vqa_metrics

DEFAULT_MAX_NEW_TOKENS = 24


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
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_finevit.evaluation.generation import greedy_generate

    requests, questions, skipped = _requests(stage, data_dir, max_samples)
    template = stage.template
    ids = greedy_generate(
        model_chunks, requests, max_new_tokens=_max_new_tokens(stage),
        seq_length=stage.data_config.llm_tokens, vit_tokens=stage.data_config.vit_tokens,
        vocab_size=stage.vl.llm.vocab_size, pad_id=template.pad_id,
        image_token_id=stage.vl.image_token_id,
        stop_ids=(template.tokenizer.token_id(IM_END), template.tokenizer.token_id(PAD_TOKEN)))
    local = ([(kind, template.tokenizer.decode(out).strip(), truth)
              for (kind, _, truth), out in zip(questions, ids)], skipped)
    shares = [local]
    if ps.get_data_parallel_world_size() > 1:
        shares = [None] * ps.get_data_parallel_world_size()
        dist.all_gather_object(shares, local, group=ps.get_data_parallel_group())
    answers = [answer for share, _ in shares for answer in share]
    scores = vqa_metrics([kind for kind, _, _ in answers], [text for _, text, _ in answers],
                         [truth for _, _, truth in answers])
    results = {f"vqa_{key}": float(value) for key, value in scores.items()}
    results["vqa_skipped"] = float(sum(count for _, count in shares))
    return results


def _max_new_tokens(stage) -> int:
    return int(getattr(stage.cfg, "eval_max_new_tokens", DEFAULT_MAX_NEW_TOKENS))


def _requests(stage, data_dir: str, max_samples: int | None):
    """This data-parallel rank's generation requests, their ``(kind, question, truth)`` (one per
    request), and the number of samples skipped."""
    import numpy as np
    from megatron.core import parallel_state as ps

    from megatron_finevit.data.bad_samples import BadSampleCounter
    from megatron_finevit.data.decode_pil import decode_pil
    from megatron_finevit.data.index import load_index
    from megatron_finevit.data.loader import SampleReader
    from megatron_finevit.data.tasks.multimodal import image_llm_tokens
    from megatron_finevit.evaluation.generation import GenerationRequest

    config, template = stage.data_config, stage.template
    use_draft = bool(getattr(getattr(stage.cfg, "data", None), "use_draft", False))
    max_new_tokens = _max_new_tokens(stage)
    index = load_index(data_dir)
    reader = SampleReader(index)
    counter = BadSampleCounter(name=f"vqa eval {data_dir}")
    with_image = np.flatnonzero(index.num_images > 0)[:max_samples]  # None: all
    requests, questions = [], []
    try:
        for sample in with_image[ps.get_data_parallel_rank()::ps.get_data_parallel_world_size()]:
            key = str(index.key[sample])
            try:
                images, meta = reader.read_images(int(sample))
                asked = vqa_questions(meta)
                image = decode_pil(images[0], config.policy, stage.norm, use_draft=use_draft)
            except BadSampleError as err:
                counter.skip_error(err, member=key)
                continue
            image_requests = [GenerationRequest(image, template.encode_prompt(
                question, image_llm_tokens(image))) for _, question, _ in asked]
            if not all(r.fits(max_new_tokens, config.llm_tokens, config.vit_tokens)
                       for r in image_requests):
                counter.skip("oversize", member=key, detail="a question does not fit a pack")
                continue
            counter.ok()
            requests += image_requests
            questions += asked
    finally:
        reader.close()
    return requests, questions, counter.num_skipped
