"""Write a synthetic VQA set (SFT conversations) from FineCap-mini shards, indexed.

    python tools/make_synthetic_vqa.py --source data/finecap-mini --out data/vqa-train \
        [--split train|eval] [--seed 0] [--max-samples N] [--samples-per-shard 256] \
        [--prefix vqa] [--max-bad-fraction 0.05]

Questions (count the shapes, the colour of a named shape, read the word), answered from the
source's ground truth: see megatron_finevit/data/synthetic_vqa.py. ``--split train`` writes 1-3
turns per image plus a few text-only conversations; ``--split eval`` (held-out images) one turn
per kind the image allows. Writes OUT/PREFIX-NNNNNN.tar and indexes them with the default resize
policy (OUT/index.zarr; re-index with tools/build_index.py for other --min/--max-pixels).
Evaluate a checkpoint on an eval split: python -m megatron_finevit.evaluate --task vqa.
"""

import argparse
import logging
import sys
from pathlib import Path

from megatron_finevit.config.errors import UserError, report_user_error
from megatron_finevit.data.bad_samples import BadSampleCounter
from megatron_finevit.data.shards import list_shards


def path_problems(source: Path, out: Path) -> list[str]:
    """One line per reason the tool cannot start."""
    if not source.is_dir():
        problems = [f"--source {source}: no such directory"]
    elif not list_shards(source):
        problems = [f"--source {source} holds no shards named PREFIX-NNNNNN.tar"]
    else:
        problems = []
    if out.is_dir() and list_shards(out):  # never mix with (or overwrite) an earlier set
        problems.append(f"--out {out} already holds shards; write into a new directory")
    return problems


def main(argv=None) -> int:
    """0 when written and indexed; 2 (one line per problem on stderr) on a user error, including
    a source with too many samples that are not FineCap-mini or none usable."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", required=True, help="FineCap-mini shard directory")
    parser.add_argument("--out", required=True, help="output shard directory (new)")
    parser.add_argument("--split", choices=("train", "eval"), default="train",
                        help="train: 1-3 turns per image and text-only conversations; eval: "
                             "one turn per allowed kind (default train)")
    parser.add_argument("--seed", type=int, default=0,
                        help="the same seed writes the same samples (default 0)")
    parser.add_argument("--max-samples", type=int, default=None,
                        help="images to use at most, in shard order (default: all)")
    parser.add_argument("--samples-per-shard", type=int, default=256,
                        help="conversations per tar shard (default 256)")
    parser.add_argument("--prefix", default="vqa", help="shard names: PREFIX-NNNNNN.tar "
                        "(default vqa)")
    parser.add_argument("--max-bad-fraction", type=float, default=0.05,
                        help="abort when more than this fraction of source samples is unusable "
                             "(default 0.05)")
    args = parser.parse_args(argv)
    if args.max_samples is not None and args.max_samples < 1:
        parser.error(f"--max-samples must be >= 1, got {args.max_samples}")
    if args.samples_per_shard < 1:
        parser.error(f"--samples-per-shard must be >= 1, got {args.samples_per_shard}")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    source, out = Path(args.source), Path(args.out)
    problems = path_problems(source, out)
    if problems:
        return report_user_error(UserError(problems))
    # Imported only now: they pull in torch and zarr (seconds); a mistyped path is reported at once.
    from megatron_finevit.data.index import build_index
    from megatron_finevit.data.synthetic_vqa import write_vqa_shards

    counter = BadSampleCounter(max_bad_fraction=args.max_bad_fraction, name="make_synthetic_vqa")
    try:
        summary = write_vqa_shards(source, out, args.split, args.seed, args.max_samples,
                                   args.prefix, args.samples_per_shard, counter)
    except RuntimeError as err:
        if counter.bad_fraction <= counter.max_bad_fraction:
            raise  # not the bad-sample budget: a bug
        return report_user_error(UserError(str(err)))
    if not summary.images:
        return report_user_error(UserError(f"--source {source} holds no usable FineCap-mini "
                                           f"sample ({counter.summary()})"))
    build_index(out, counter=BadSampleCounter(max_bad_fraction=args.max_bad_fraction,
                                              name="build_index"))
    print(f"wrote {summary.line()} into {out}; {counter.summary()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
