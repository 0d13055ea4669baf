"""Write the synthetic FineCap-mini data set as WebDataset shards.

    python tools/make_synthetic_data.py --out data/finecap-mini --num 2000 --seed 0 \
        [--samples-per-shard 256] [--square-size 224 --shape-scale 0.3 0.6 --max-shapes 2 --grid-cell 56]

Then index it: python tools/build_index.py data/finecap-mini
"""

import argparse
import logging

from megatron_finevit.data.synthetic import SceneSpec, make_synthetic_shards


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
    parser.add_argument("--square-size", type=int, default=None,
                        help="every image this many pixels square (default: FineCap-mini's "
                             "sizes, short side 200-600, aspect 1-3)")
    parser.add_argument("--shape-scale", type=float, nargs=2, default=(0.15, 0.35),
                        metavar=("LOW", "HIGH"),
                        help="shape side as a fraction of the short side (default 0.15 0.35)")
    parser.add_argument("--max-shapes", type=int, default=4, help="shapes per image, 1..N "
                        "(default 4)")
    parser.add_argument("--max-words", type=int, default=2, help="words per image, 0..N "
                        "(default 2)")
    parser.add_argument("--grid-cell", type=int, default=None, metavar="PIXELS",
                        help="place shapes on a grid of PIXELS-wide cells: sides whole cells, "
                             "corners on cell boundaries (default: anywhere)")
    args = parser.parse_args(argv)
    try:
        spec = SceneSpec(args.square_size, tuple(args.shape_scale), args.max_shapes,
                         args.max_words, args.grid_cell)
    except ValueError as exc:
        parser.error(str(exc))
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    shards = make_synthetic_shards(args.out, args.num, args.seed, args.samples_per_shard,
                                   args.prefix, spec=spec)
    logging.info("wrote %d samples in %d shards to %s", args.num, len(shards), args.out)


if __name__ == "__main__":
    main()
