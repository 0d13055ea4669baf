"""Train a small SentencePiece model on the captions of an indexed shard directory.

    python tools/train_caption_tokenizer.py SHARD_DIR OUT.model [--vocab-size 200]

The tiny Stage II runs need a tokenizer their text tower can embed; the paper-scale config points
at the Gemma SentencePiece model SigLIP2 uses instead. Pad id 0, EOS id 1, BOS id 2 (Gemma's).
"""

import argparse
import io
from pathlib import Path

from tqdm import tqdm

from megatron_finevit.data.shards import iter_shard, list_shards


def train_caption_tokenizer(shard_dir: str | Path, out_file: str | Path,
                            vocab_size: int = 200) -> Path:
    import sentencepiece

    captions = [meta.get("caption", "")
                for shard in tqdm(list_shards(shard_dir), desc="reading captions", unit="shard")
                for _, _, meta in iter_shard(shard)]
    if not captions:
        raise ValueError(f"no captions in {shard_dir}")
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(captions), model_writer=model, vocab_size=vocab_size,
        model_type="unigram", pad_id=0, eos_id=1, bos_id=2, unk_id=3,
        character_coverage=1.0, hard_vocab_limit=False, minloglevel=2)
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    out_file.write_bytes(model.getvalue())
    return out_file


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("shard_dir", help="indexed shard directory whose captions to read")
    parser.add_argument("out_file", help="SentencePiece model file to write (e.g. tok.model)")
    parser.add_argument("--vocab-size", type=int, default=200,
                        help="pieces, at most the text tower's vocab_size (default 200)")
    args = parser.parse_args(argv)
    path = train_caption_tokenizer(args.shard_dir, args.out_file, args.vocab_size)
    print(f"SentencePiece model written to {path}")


if __name__ == "__main__":
    main()
