"""A FineViT-VL export as a VLMEvalKit model, for the paper's benchmarks (MMBench, MMStar,
OCRBench, DocVQA, ChartQA, AI2D, RefCOCO, CountBenchQA, ...).

VLMEvalKit's custom-model interface: ``generate(message, dataset=None) -> str`` where
``message`` is a list of ``{"type": "image" | "text", "value": path or text}`` items in reading
order (``BaseModel.generate`` normalises plain strings and image paths into that form, then calls
``generate_inner``). ``FineViTVLChat`` subclasses VLMEvalKit's ``BaseModel`` when VLMEvalKit is
importable and stands alone otherwise (the same ``generate``), so it is usable and testable without
it. Registration (VLMEvalKit's ``vlmeval/config.py``)::

    from functools import partial
    from megatron_finevit.evaluation.vlmeval import FineViTVLChat
    supported_VLM["FineViT-VL"] = partial(FineViTVLChat, model_path="/path/to/finevit_vl_hf")

then ``python run.py --data MMBench_DEV_EN MMStar OCRBench --model FineViT-VL``.

Decoding is greedy (``do_sample=False``) through transformers' ``generate()`` on the export made by
``tools/convert_checkpoint.py mcore-to-hf --model finevit-vl``, with its ``AutoProcessor`` (the
training image path and chat template). One user turn holds the message's images (in order) and
its text; the processor's chat template writes a turn's image blocks before its text, as Stage III
trained. The answer is decoded without special tokens and stripped.
"""

from __future__ import annotations

import os
from pathlib import Path

try:  # VLMEvalKit, when installed: its BaseModel supplies generate() and message checks
    from vlmeval.vlm.base import BaseModel as _Base
except ImportError:  # stand-alone: the same interface, normalised here
    _Base = object


def normalise_message(message) -> list[dict]:
    """VLMEvalKit's message forms -> ``[{"type", "value"}]``: a string (an existing image file is
    an image, anything else text), a list of strings, or a list of typed dicts."""
    items = [message] if isinstance(message, str) else list(message)
    out = []
    for item in items:
        if isinstance(item, dict):
            if item.get("type") not in ("image", "text") or "value" not in item:
                raise ValueError(f"message item {item!r} needs type image|text and a value")
            out.append({"type": item["type"], "value": item["value"]})
        elif isinstance(item, str):
            is_image = os.path.isfile(item) and Path(item).suffix.lower() in (
                ".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
            out.append({"type": "image" if is_image else "text", "value": item})
        else:
            raise ValueError(f"message item of type {type(item).__name__}: expected str or dict")
    return out


class FineViTVLChat(_Base):
    """Greedy answers of a FineViT-VL transformers export (see the module docstring)."""

    INSTALL_REQ = False
    INTERLEAVE = True

    def __init__(self, model_path: str, max_new_tokens: int = 512,
                 max_pixels: int = 1000 * 1000, device: str | None = None, **kwargs):
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        import megatron_finevit.hf  # noqa: F401  (registers the Auto classes)

        if _Base is not object:
            super().__init__()
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.processor = AutoProcessor.from_pretrained(model_path)
        dtype = torch.bfloat16 if self.device.startswith("cuda") else torch.float32
        self.model = AutoModelForImageTextToText.from_pretrained(
            model_path, dtype=dtype).to(self.device).eval()
        self.max_new_tokens, self.max_pixels = max_new_tokens, max_pixels
        self.generate_kwargs = kwargs

    def prompt_inputs(self, message) -> dict:
        """The processor's tensors for one user turn holding the message's images and text."""
        from PIL import Image

        items = normalise_message(message)
        images = [Image.open(item["value"]).convert("RGB") for item in items
                  if item["type"] == "image"]
        content = [{"type": "image"} for _ in images] + [
            {"type": "text", "text": "\n".join(item["value"] for item in items
                                               if item["type"] == "text")}]
        text = self.processor.apply_chat_template([{"role": "user", "content": content}],
                                                  add_generation_prompt=True, tokenize=False)
        return self.processor(images=images or None, text=[text], return_tensors="pt",
                              max_pixels=self.max_pixels)

    def generate_inner(self, message, dataset: str | None = None) -> str:
        """Greedy answer to ``message`` (``dataset``, VLMEvalKit's benchmark name, is unused: one
        prompt format for all)."""
        return self.processor.tokenizer.decode(self.answer_ids(message), skip_special_tokens=True
                                               ).strip()

    def answer_ids(self, message) -> list[int]:
        """The greedy answer's token ids, without the stop token."""
        import torch

        inputs = self.prompt_inputs(message).to(self.device)
        with torch.no_grad():
            out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens,
                                      do_sample=False,
                                      suppress_tokens=[self.model.config.image_token_id],
                                      **self.generate_kwargs)
        ids = out[0, inputs["input_ids"].shape[1]:].tolist()
        eos = self.model.generation_config.eos_token_id
        stops = set(eos if isinstance(eos, list) else [eos])
        while ids and ids[-1] in stops:
            ids.pop()
        return ids

    if _Base is object:
        def generate(self, message, dataset: str | None = None) -> str:
            return self.generate_inner(message, dataset)
