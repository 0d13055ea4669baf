"""Packing efficiency of `PackedBatchSampler` against padding each batch to its largest image.

    python tools/bench_packing.py --num-samples 200000 --token-budget 16384 --buffer-size 2048

Image sizes are drawn to match the paper's Stage II data statistics (App. A.1): of the images,
2.5% / 87.2% / 97.5% have fewer pixels than 256² / 512² / 1024², sides are capped at 4096, and
the aspect ratio peaks at 1 and spans up to 3. Between those anchors the pixel count is log-uniform
(the paper gives only the cumulative anchors); the aspect ratio is exactly 1 for 30% of images,
otherwise |ln(aspect)| is exponential with mean 0.35 truncated at ln 3, landscape 60% of the time
(our assumptions: the paper shows the shape, not its parameters).

Each image is resized with the project's `smart_resize` under a stage's pixel cap and costs
(h/14)·(w/14) ViT tokens. Efficiency = real tokens / computed tokens:

* packing: every pack computes `token_budget` tokens;
* padding: batches of B consecutive images (B = the packer's mean images per pack) each compute
  B × (largest image in the batch).

One row per training stage's pixel cap; the last line is the selected stage's packing efficiency,
exactly `packing_efficiency=<fraction>`.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from tqdm import tqdm

from megatron_finevit.data.bad_samples import BadSampleError
from megatron_finevit.data.packing import PackedBatchSampler
from megatron_finevit.data.resize import STAGE_MAX_PIXELS, ResizePolicy

# (pixels, fraction of images with fewer pixels): paper App. A.1; 224² is the curation floor
# (short side >= 224 for Stages I/II) and 4096² the largest image the statistics mention.
PIXEL_CDF_ANCHORS = ((224**2, 0.0), (256**2, 0.025), (512**2, 0.872), (1024**2, 0.975),
                     (4096**2, 1.0))
MAX_SIDE = 4096
SQUARE_FRACTION = 0.30
LOG_ASPECT_MEAN = 0.35
LANDSCAPE_FRACTION = 0.60
MAX_ASPECT = 3.0


def sample_image_sizes(num: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Heights and widths `[num]` (ints) following the App. A.1 statistics (see module doc)."""
    pixels, cdf = (np.array(v, dtype=np.float64) for v in zip(*PIXEL_CDF_ANCHORS))
    log_pixels = np.interp(rng.random(num), cdf, np.log(pixels))
    # Truncated exponential by inversion, so no sample is rejected.
    cap = 1.0 - np.exp(-np.log(MAX_ASPECT) / LOG_ASPECT_MEAN)
    log_aspect = -LOG_ASPECT_MEAN * np.log1p(-rng.random(num) * cap)
    log_aspect[rng.random(num) < SQUARE_FRACTION] = 0.0
    log_aspect *= np.where(rng.random(num) < LANDSCAPE_FRACTION, 1.0, -1.0)  # ln(width / height)
    height = np.exp((log_pixels - log_aspect) / 2)
    width = np.exp((log_pixels + log_aspect) / 2)
    shrink = np.minimum(1.0, MAX_SIDE / np.maximum(height, width))
    return (np.maximum(2, np.round(height * shrink)).astype(np.int64),
            np.maximum(2, np.round(width * shrink)).astype(np.int64))


def patch_tokens(heights: np.ndarray, widths: np.ndarray, policy: ResizePolicy) -> np.ndarray:
    """ViT tokens per image after `smart_resize`; images the policy rejects get 0 (dropped)."""
    tokens = np.zeros(len(heights), dtype=np.int64)
    for i, (h, w) in enumerate(zip(heights.tolist(), widths.tolist())):
        try:
            tokens[i] = policy.num_patches(h, w)
        except BadSampleError:  # aspect just above 3 after integer rounding
            pass
    return tokens


def padded_batch_efficiency(tokens: np.ndarray, batch_size: int) -> float:
    """Real / computed tokens when each batch of `batch_size` images is padded to its largest."""
    usable = len(tokens) // batch_size * batch_size
    batches = tokens[:usable].reshape(-1, batch_size)
    return float(batches.sum() / (batches.max(axis=1).sum() * batch_size))


def bench_stage(tokens: np.ndarray, args) -> dict:
    sampler = PackedBatchSampler(tokens, args.token_budget, buffer_size=args.buffer_size,
                                 seed=args.seed, min_fill=args.min_fill)
    start = time.perf_counter()
    for _ in sampler:  # one epoch
        pass
    seconds = time.perf_counter() - start
    stats = sampler.stats
    batch_size = max(1, round(stats.samples_per_pack))
    # The padding baseline sees the images in the same shuffled order as the packer.
    shuffled = tokens[sampler.shard(0)]
    return {"packing": stats.efficiency, "padding": padded_batch_efficiency(shuffled, batch_size),
            "batch_size": batch_size, "packs": stats.num_packs, "oversize": sampler.num_oversize,
            "mean_tokens": float(tokens.mean()), "samples_per_s": stats.num_samples / seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-samples", type=int, default=200_000)
    parser.add_argument("--token-budget", type=int, default=16384, help="ViT tokens per pack")
    parser.add_argument("--buffer-size", type=int, default=2048)
    parser.add_argument("--min-fill", type=float, default=0.95)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stage", choices=sorted(STAGE_MAX_PIXELS), default="contrastive_end",
                        help="stage whose packing efficiency is the final line")
    args = parser.parse_args()

    heights, widths = sample_image_sizes(args.num_samples, np.random.default_rng(args.seed))
    pixels = heights * widths
    below = ", ".join(f"{(pixels < side**2).mean():.1%} < {side}²" for side in (256, 512, 1024))
    aspect = (np.maximum(heights, widths) / np.minimum(heights, widths)).max()
    print(f"{args.num_samples} images: {below}; max aspect {aspect:.2f}; "
          f"token budget {args.token_budget}, buffer {args.buffer_size}")
    print(f"{'stage':<18} {'max_pixels':>10} {'tokens/img':>10} {'imgs/pack':>9} "
          f"{'packing':>8} {'padding':>8} {'samples/s':>10}")
    caps = sorted(set(STAGE_MAX_PIXELS.values()))
    by_cap = {}
    for max_pixels in tqdm(caps, desc="pixel caps", unit="cap", disable=None):
        tokens = patch_tokens(heights, widths, ResizePolicy(max_pixels=max_pixels))
        by_cap[max_pixels] = r = bench_stage(tokens[tokens > 0], args)
        stages = "+".join(s for s, cap in STAGE_MAX_PIXELS.items() if cap == max_pixels)
        tqdm.write(f"{stages:<18} {max_pixels:>10} {r['mean_tokens']:>10.1f} {r['batch_size']:>9} "
                   f"{r['packing']:>8.4f} {r['padding']:>8.4f} {r['samples_per_s']:>10.0f}"
                   + (f"  ({r['oversize']} oversize skipped)" if r["oversize"] else ""))
    print(f"packing_efficiency={by_cap[STAGE_MAX_PIXELS[args.stage]]['packing']:.4f}")


if __name__ == "__main__":
    main()
