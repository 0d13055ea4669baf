"""Import conversation data (LLaVA JSON/JSONL or the `messages` form) into shards + index.

    python tools/import_conversations.py INPUT --out SHARD_DIR [--images DIR] \
        [--prefix conversations] [--samples-per-shard 1000] [--max-bad-fraction 0.05]

Formats and what gets skipped: see megatron_finevit/data/conversation_import.py. Image paths are
relative to --images (default: INPUT's folder). Writes SHARD_DIR/PREFIX-NNNNNN.tar and indexes
them with the default resize policy (SHARD_DIR/index.zarr; run tools/build_index.py SHARD_DIR
with other --min-pixels/--max-pixels to re-index).
"""

import argparse
import logging
import sys
from pathlib import Path

from megatron_finevit.config.errors import UserError, report_user_error
from megatron_finevit.data.bad_samples import BadSampleCounter
from megatron_finevit.data.shards import list_shards


def path_problems(source: Path, images: Path, out: Path) -> list[str]:
    """One line per reason the import cannot start."""
    problems = []
    if not source.is_file():
        problems.append(f"INPUT {source}: no such file")
    if not images.is_dir():
        problems.append(f"--images {images}: no such directory")
    if out.is_dir() and list_shards(out):  # never mix with (or overwrite) an earlier import
        problems.append(f"--out {out} already holds shards; import into a new directory")
    return problems


def main(argv=None) -> int:
    """0 when imported; 2 (one line per problem on stderr) on a user error, including too many
    unusable records."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("input", help="JSON list or JSONL file of conversation records")
    parser.add_argument("--out", required=True, help="output shard directory")
    parser.add_argument("--images", help="folder the image paths are relative to "
                                         "(default: INPUT's folder)")
    parser.add_argument("--prefix", default="conversations",
                        help="shard names: PREFIX-NNNNNN.tar (default conversations)")
    parser.add_argument("--samples-per-shard", type=int, default=1000,
                        help="samples per tar shard (default 1000)")
    parser.add_argument("--max-bad-fraction", type=float, default=0.05,
                        help="abort when more than this fraction of records is unusable "
                             "(default 0.05)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    source, out = Path(args.input), Path(args.out)
    images = Path(args.images) if args.images else source.parent
    problems = path_problems(source, images, out)
    if problems:
        return report_user_error(UserError(problems))
    # Imported only now: they pull in torch and zarr (seconds), and a mistyped path should be
    # reported at once.
    from megatron_finevit.data.conversation_import import import_conversations
    from megatron_finevit.data.index import build_index

    counter = BadSampleCounter(max_bad_fraction=args.max_bad_fraction,
                               name="import_conversations")
    try:
        summary = import_conversations(source, images, out, args.prefix, args.samples_per_shard,
                                       counter)
    except UserError as err:
        return report_user_error(err)
    except RuntimeError as err:
        if counter.bad_fraction <= counter.max_bad_fraction:
            raise  # not the bad-sample budget: a bug
        return report_user_error(UserError(str(err)))
    if not summary.conversations:
        return report_user_error(UserError(f"INPUT {source} holds no usable conversation "
                                           f"({counter.summary()})"))
    build_index(out, counter=BadSampleCounter(max_bad_fraction=args.max_bad_fraction,
                                              name="build_index"))
    print(f"imported {summary.line()} into {out}; {counter.summary()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
