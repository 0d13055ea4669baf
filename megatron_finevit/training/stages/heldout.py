"""What the FineViT-VL held-out evaluations share (Stage III region QA, SFT VQA): reading the
held-out samples a data-parallel rank is dealt, turning them into generation requests, greedy
answers at the run's layout, and gathering every rank's answers.

Dealing: the given index rows go to the data-parallel ranks round-robin (disjoint shares; every
rank of a model-parallel group takes the same share and decodes the same images, so a broken
image is skipped on every pipeline stage alike). Unreadable or undecodable samples are counted
by the ``BadSampleCounter`` reasons of the training loaders; a sample any of whose requests does
not fit the training pack budgets is skipped whole (``oversize``).

Answers: ``evaluation.generation.greedy_generate`` with packs of the training budgets
(``llm_tokens`` / ``vit_tokens``), ``eval_max_new_tokens`` at most, stopping at ``<|im_end|>`` /
``<|endoftext|>``; the text is decoded and stripped.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from megatron_finevit.data.bad_samples import BadSampleError
from megatron_finevit.data.tasks.chat import IM_END, PAD_TOKEN

DEFAULT_MAX_NEW_TOKENS = 24

# ask(key, meta, images) -> [(question, prompt ids, image)]: the requests of one held-out sample
Ask = Callable[[str, dict, list[torch.Tensor]], list[tuple[Any, list[int], torch.Tensor]]]


def max_new_tokens(stage) -> int:
    return int(getattr(stage.cfg, "eval_max_new_tokens", DEFAULT_MAX_NEW_TOKENS))


def held_out_requests(stage, data_dir: str, rows: Sequence[int], ask: Ask, name: str
                      ) -> tuple[list, list, int]:
    """This data-parallel rank's ``(requests, questions, samples skipped)`` from ``rows`` of the
    indexed shards ``data_dir``: each sample's images decoded at the run's policy, then
    ``ask``'s questions and prompts (BadSampleError from it skips the sample, counted)."""
    from megatron.core import parallel_state as ps

    from megatron_finevit.data.bad_samples import BadSampleCounter
    from megatron_finevit.data.decode_pil import decode_pil
    from megatron_finevit.data.index import load_index
    from megatron_finevit.data.loader import SampleReader
    from megatron_finevit.evaluation.generation import GenerationRequest

    config = stage.data_config
    use_draft = bool(getattr(getattr(stage.cfg, "data", None), "use_draft", False))
    new_tokens = max_new_tokens(stage)
    index = load_index(data_dir)
    reader = SampleReader(index)
    counter = BadSampleCounter(name=f"{name} {data_dir}")
    requests, questions = [], []
    try:
        for sample in list(rows)[ps.get_data_parallel_rank()::ps.get_data_parallel_world_size()]:
            key = str(index.key[sample])
            try:
                encoded, meta = reader.read_images(int(sample))
                images = [decode_pil(data, config.policy, stage.norm, use_draft=use_draft)
                          for data in encoded]
                asked = ask(key, meta, images)
            except BadSampleError as err:
                counter.skip_error(err, member=key)
                continue
            sample_requests = [GenerationRequest(image, prompt) for _, prompt, image in asked]
            if not all(r.fits(new_tokens, config.llm_tokens, config.vit_tokens)
                       for r in sample_requests):
                counter.skip("oversize", member=key, detail="a question does not fit a pack")
                continue
            counter.ok()
            requests += sample_requests
            questions += [question for question, _, _ in asked]
    finally:
        reader.close()
    return requests, questions, counter.num_skipped


def greedy_answers(stage, model_chunks: list, requests: list) -> list[str]:
    """The decoded, stripped greedy answer to each request."""
    from megatron_finevit.evaluation.generation import greedy_generate

    template = stage.template
    ids = greedy_generate(
        model_chunks, requests, max_new_tokens=max_new_tokens(stage),
        seq_length=stage.data_config.llm_tokens, vit_tokens=stage.data_config.vit_tokens,
        vocab_size=stage.vl.llm.vocab_size, pad_id=template.pad_id,
        image_token_id=stage.vl.image_token_id,
        stop_ids=(template.tokenizer.token_id(IM_END), template.tokenizer.token_id(PAD_TOKEN)))
    return [template.tokenizer.decode(out).strip() for out in ids]


def gather_over_data_parallel(local: Any) -> list:
    """Every data-parallel rank's ``local`` (picklable), in rank order."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    if ps.get_data_parallel_world_size() == 1:
        return [local]
    shares = [None] * ps.get_data_parallel_world_size()
    dist.all_gather_object(shares, local, group=ps.get_data_parallel_group())
    return shares
