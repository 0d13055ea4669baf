"""Convert an image folder + JSONL manifest into WebDataset shards.

    python tools/import_jsonl.py --images DIR --manifest FILE.jsonl --out SHARD_DIR \
        [--prefix imported] [--samples-per-shard 1000] [--max-bad-fraction 0.05]

Manifest format: see megatron_finevit/data/jsonl_import.py.
Then index the shards: python tools/build_index.py SHARD_DIR
"""

import argparse
import logging

from megatron_finevit.data.bad_samples import BadSampleCounter
from megatron_finevit.data.jsonl_import import import_jsonl


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", required=True,
                        help="folder the manifest's image paths are relative to")
    parser.add_argument("--manifest", required=True, help="JSONL file, one sample per line")
    parser.add_argument("--out", required=True, help="output shard directory")
    parser.add_argument("--prefix", default="imported",
                        help="shard names: PREFIX-NNNNNN.tar (default imported)")
    parser.add_argument("--samples-per-shard", type=int, default=1000,
                        help="samples per tar shard (default 1000)")
    parser.add_argument("--max-bad-fraction", type=float, default=0.05,
                        help="abort when more than this fraction of samples is unusable "
                             "(default 0.05)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    counter = BadSampleCounter(max_bad_fraction=args.max_bad_fraction, name="import_jsonl")
    import_jsonl(args.images, args.manifest, args.out, args.prefix, args.samples_per_shard, counter)


if __name__ == "__main__":
    main()
