"""Write the synthetic FineCap-mini data set as WebDataset shards.

    python tools/make_synthetic_data.py --out data/finecap-mini --num 2000 --seed 0 \
        [--samples-per-shard 256]

Then index it: python tools/build_index.py data/finecap-mini
"""

import argparse
import logging

from megatron_finevit.data.synthetic import make_synthetic_shards


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output directory for the shards")
    parser.add_argument("--num", type=int, required=True, help="number of samples")
    parser.add_argument("--seed", type=int, default=0,
                        help="the same seed writes the same samples (default 0)")
    parser.add_argument("--samples-per-shard", type=int, default=256,
                        help="samples per tar shard (default 256)")
    parser.add_argument("--prefix", default="finecap-mini",
                        help="shard names: PREFIX-NNNNNN.tar (default finecap-mini)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    shards = make_synthetic_shards(args.out, args.num, args.seed, args.samples_per_shard,
                                   args.prefix)
    logging.info("wrote %d samples in %d shards to %s", args.num, len(shards), args.out)


if __name__ == "__main__":
    main()
