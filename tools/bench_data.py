"""Decode throughput: DALI (CPU, 2 threads) vs the PIL reference decoder, side by side.

    python tools/bench_data.py [--quick] [--num-images 240] [--reps 5] [--threads 2]

Builds shards from real photos shipped with installed packages (scikit-image's astronaut, coffee,
chelsea, rocket, hubble_deep_field, retina, immunohistochemistry, motorcycle; matplotlib's
grace_hopper), re-encoded as JPEG q90, mixed 1:1 with synthetic FineCap-mini samples, indexes
them, then times full epochs (tar read → decode → smart_resize → normalise → torch tensors)
of both decoders in alternation and reports medians. PIL decodes at full size (no `Image.draft`),
on one thread: it is the reference path as the loader runs it per worker. The last line is
`dali_vs_pil=<ratio of images/s>`.
"""

import argparse
import io
import itertools
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from megatron_finevit.data.decode_dali import DaliDecoder
from megatron_finevit.data.decode_pil import iter_decoded
from megatron_finevit.data.index import build_index
from megatron_finevit.data.resize import ResizePolicy
from megatron_finevit.data.shards import ShardWriter, list_shards
from megatron_finevit.data.synthetic import make_sample
from megatron_finevit.logs import quiet_third_party_logs

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "retina",
          "immunohistochemistry")


def real_photos() -> list[Image.Image]:
    from matplotlib import cbook
    from skimage import data
    images = [Image.fromarray(getattr(data, name)()).convert("RGB") for name in PHOTOS]
    images.append(Image.fromarray(data.stereo_motorcycle()[0]).convert("RGB"))
    with cbook.get_sample_data("grace_hopper.jpg") as f:
        images.append(Image.open(f).convert("RGB"))
    return images


def write_bench_shards(out_dir: Path, num_images: int) -> None:
    photos = real_photos()
    with ShardWriter(out_dir, prefix="bench", max_samples_per_shard=64) as writer:
        for i in tqdm(range(num_images), desc="writing shards", unit="img"):
            if i % 2:
                image_bytes, meta = make_sample(seed=123, index=i)
            else:
                photo = photos[(i // 2) % len(photos)]
                buf = io.BytesIO()
                photo.save(buf, "JPEG", quality=90)
                image_bytes = buf.getvalue()
                meta = {"caption": "photo", "width": photo.width, "height": photo.height}
            writer.write(f"{i:06d}", image_bytes, meta)


def time_epoch(run) -> tuple[float, int]:
    start = time.perf_counter()
    count = run()
    return time.perf_counter() - start, count


def main(argv=None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small run (< 1 minute)")
    parser.add_argument("--num-images", type=int, default=None,
                        help="images in the benchmark shards (default 320, 80 with --quick)")
    parser.add_argument("--reps", type=int, default=None,
                        help="timed epochs per decoder (default 5, 3 with --quick)")
    parser.add_argument("--threads", type=int, default=2, help="DALI CPU threads")
    args = parser.parse_args(argv)
    num_images = args.num_images or (80 if args.quick else 320)
    reps = args.reps or (3 if args.quick else 5)
    logging.basicConfig(level=logging.WARNING)
    quiet_third_party_logs()
    policy = ResizePolicy()  # Stage III budget: within 1000×1000

    with tempfile.TemporaryDirectory() as tmp:
        shard_dir = Path(tmp)
        write_bench_shards(shard_dir, num_images)
        build_index(shard_dir, policy)
        shards = list_shards(shard_dir)
        dali = DaliDecoder(shard_dir, policy, batch_size=16, num_threads=args.threads,
                           device="cpu")

        def run_pil() -> int:
            return sum(1 for _ in iter_decoded(shards, policy))

        def run_dali() -> int:
            return sum(len(batch) for batch in dali)

        print("warm-up: one epoch of each decoder", file=sys.stderr, flush=True)
        run_dali(), run_pil()  # warm-up: page cache, DALI buffers, allocator
        rates = {"pil": [], "dali": []}
        decoders = (("pil", run_pil), ("dali", run_dali))
        timed = tqdm(list(itertools.product(range(reps), decoders)), desc="timed epochs",
                     unit="epoch")
        for _, (name, run) in timed:
            timed.set_postfix(decoder=name)
            seconds, count = time_epoch(run)
            assert count == num_images, (name, count)
            rates[name].append(count / seconds)
    pil, dali_rate = statistics.median(rates["pil"]), statistics.median(rates["dali"])
    print(f"images={num_images} (half real photos, half synthetic) reps={reps} "
          f"max_pixels={policy.max_pixels} dali_threads={args.threads}")
    print(f"pil:  median {pil:.1f} images/s  (runs: {', '.join(f'{r:.1f}' for r in rates['pil'])})")
    print(f"dali: median {dali_rate:.1f} images/s  (runs: "
          f"{', '.join(f'{r:.1f}' for r in rates['dali'])})")
    ratio = dali_rate / pil
    print(f"dali_vs_pil={ratio:.2f}")
    return ratio


if __name__ == "__main__":
    main()
