"""Build (or extend) the zarr sample index of a shard directory.

    python tools/build_index.py SHARD_DIR [--min-pixels 3136] [--max-pixels 1000000] \
        [--factor 28] [--max-aspect-ratio 3.0] [--max-bad-fraction 0.05]

Writes SHARD_DIR/index.zarr and SHARD_DIR/dali_index/*.idx. Re-running reads only shards that
are not indexed yet; a changed/removed shard or a different policy rebuilds the index.
"""

import argparse
import logging
import sys
from pathlib import Path

from megatron_finevit.config.errors import UserError, report_user_error
from megatron_finevit.data.bad_samples import BadSampleCounter
from megatron_finevit.data.index import build_index
from megatron_finevit.data.resize import (DEFAULT_MAX_ASPECT_RATIO, DEFAULT_MAX_PIXELS,
                                          DEFAULT_MIN_PIXELS, MERGE_FACTOR, ResizePolicy)
from megatron_finevit.data.shards import list_shards


def main(argv=None) -> int:
    """0 when indexed; 2 (one line on stderr) when SHARD_DIR is missing or holds no shards."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("shard_dir")
    parser.add_argument("--factor", type=int, default=MERGE_FACTOR)
    parser.add_argument("--min-pixels", type=int, default=DEFAULT_MIN_PIXELS)
    parser.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS)
    parser.add_argument("--max-aspect-ratio", type=float, default=DEFAULT_MAX_ASPECT_RATIO)
    parser.add_argument("--max-bad-fraction", type=float, default=0.05,
                        help="abort if more than this fraction of samples is unusable")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    policy = ResizePolicy(factor=args.factor, min_pixels=args.min_pixels,
                          max_pixels=args.max_pixels, max_aspect_ratio=args.max_aspect_ratio)
    counter = BadSampleCounter(max_bad_fraction=args.max_bad_fraction, name="build_index")
    shard_dir = Path(args.shard_dir)
    if not shard_dir.is_dir():
        return report_user_error(UserError(f"SHARD_DIR {shard_dir}: no such directory"))
    if not list_shards(shard_dir):
        return report_user_error(UserError(
            f"SHARD_DIR {shard_dir} holds no shards named PREFIX-NNNNNN.tar"))
    build_index(shard_dir, policy, counter=counter)
    return 0


if __name__ == "__main__":
    sys.exit(main())
