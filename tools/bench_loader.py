"""The full packed loader with DALI vs PIL decode, side by side, at each stage's resolution.

    python tools/bench_loader.py [--num-images 480] [--packs 24] [--reps 3] [--threads 2]
                                 [--device cpu|cuda]

Shards as ``tools/bench_data.py`` writes them (real photos shipped with scikit-image and
matplotlib, re-encoded as JPEG q90, mixed 1:1 with synthetic FineCap-mini samples) and their
index go to a temp dir. For each resolution policy (Stage I 256², Stage II 448², Stage III /
SFT ≤ 1000²) one ``PackedImageLoader`` per decoder runs the whole path: sampler → tar reads →
decode → smart_resize → normalise → patchify → pack. Both decoders get the same CPU thread count:
DALI ``--threads`` threads, PIL ``--threads`` decode worker processes (its parallel path; PIL
decodes at full size, no draft). Both loaders draw the same packs. Timed windows alternate
between the decoders; each window first consumes the packs its loader decoded ahead while idle
(untimed), so neither gets a head start, and both time the same packs. Prints images/s and real
tokens/s (medians) per decoder and resolution, then ``loader_dali_vs_pil_<res>=`` the median over
windows of the images/s ratio on the same packs.

``--device cuda`` decodes with DALI ``mixed`` (nvJPEG); not runnable on a CPU-only machine.
"""

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_data import write_bench_shards  # noqa: E402

from megatron_finevit.data.index import build_index  # noqa: E402
from megatron_finevit.data.loader import PackedImageLoader  # noqa: E402
from megatron_finevit.data.resize import ResizePolicy  # noqa: E402
from megatron_finevit.logs import quiet_third_party_logs  # noqa: E402

# side of the max_pixels square -> pack_tokens (a pack holds several of the largest images)
RESOLUTIONS = {256: 2048, 448: 4096, 1000: 16384}


def timed_window(loader: PackedImageLoader, packs: int, skip: int) -> tuple[float, int, int]:
    """(seconds, images, real tokens) over ``packs`` packs, after ``skip`` untimed ones (at
    least the packs decoded ahead while the loader was idle)."""
    for _ in range(skip):
        next(loader)
    start, images, tokens = time.perf_counter(), 0, 0
    for _ in range(packs):
        batch = next(loader)
        images += batch.num_images
        tokens += sum(batch.image_tokens)
    return time.perf_counter() - start, images, tokens


def bench_resolution(shard_dir: Path, side: int, args
                     ) -> tuple[dict[str, tuple[float, float]], float]:
    """({decoder: (median images/s, median tokens/s)}, median DALI/PIL ratio) at side²."""
    phases = [(0, ResizePolicy(max_pixels=side * side))]
    loaders = {name: PackedImageLoader(shard_dir, phases, RESOLUTIONS[side], seed=1,
                                       buffer_size=64, decoder=name, num_workers=args.threads,
                                       dali_device="mixed" if args.device == "cuda" else "cpu")
               for name in ("pil", "dali")}
    rates = {name: ([], []) for name in loaders}
    skip = max(max(loader._lookahead, 1) for loader in loaders.values())  # same packs timed
    try:
        for name, loader in loaders.items():  # warm-up: workers, DALI build, page cache
            timed_window(loader, 2, skip)
        for _ in range(args.reps):
            for name, loader in loaders.items():
                seconds, images, tokens = timed_window(loader, args.packs, skip)
                rates[name][0].append(images / seconds)
                rates[name][1].append(tokens / seconds)
    finally:
        for loader in loaders.values():
            loader.close()
    ratio = statistics.median(d / p for d, p in zip(rates["dali"][0], rates["pil"][0]))
    return ({name: (statistics.median(i), statistics.median(t)) for name, (i, t) in rates.items()},
            ratio)


def main(argv=None) -> dict[int, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # 24-pack windows: with 12 the 448² ratio ranged 1.48-1.71 over three idle runs
    parser.add_argument("--num-images", type=int, default=480, help="images in the shards")
    parser.add_argument("--packs", type=int, default=24, help="packs per timed window")
    parser.add_argument("--reps", type=int, default=3, help="timed windows per decoder")
    parser.add_argument("--threads", type=int, default=2,
                        help="DALI CPU threads = PIL decode worker processes")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cuda: DALI 'mixed' (nvJPEG) decode; needs a GPU")
    parser.add_argument("--resolutions", type=int, nargs="+", default=list(RESOLUTIONS),
                        choices=list(RESOLUTIONS))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    quiet_third_party_logs()
    ratios = {}
    with tempfile.TemporaryDirectory() as tmp:
        shard_dir = Path(tmp)
        write_bench_shards(shard_dir, args.num_images)
        build_index(shard_dir, progress=False)
        print(f"images={args.num_images} (half real photos, half synthetic) threads="
              f"{args.threads} (DALI threads / PIL worker processes) packs={args.packs} "
              f"reps={args.reps} device={args.device}")
        for side in args.resolutions:
            result, ratios[side] = bench_resolution(shard_dir, side, args)
            for name, (images, tokens) in result.items():
                print(f"{side}² {name:4s}: {images:7.1f} images/s {tokens:9.0f} tokens/s",
                      flush=True)
    for side, ratio in ratios.items():
        print(f"loader_dali_vs_pil_{side}={ratio:.2f}")
    return ratios


if __name__ == "__main__":
    main()
