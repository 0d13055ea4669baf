"""Cost of Stage II's ``loss_scope: step`` (the gradient cache) against ``micro_batch``, on CPU.

    python tools/bench_siglip.py            # ~15 s on 2 cores
    python tools/bench_siglip.py --reps 10 --global-batch 8

Measured: two trainers of the same tiny Stage II run (tiny ViT + text tower, synthetic data,
fp32, one gloo rank), one per loss scope, built from the same seed and stepped alternately
(``--reps`` steps each after a warm-up step); ``siglip_step_overhead`` is the median step time
with ``step`` over the median with ``micro_batch`` (``step`` embeds every micro-batch once more
without autograd, at most about a third of a forward+backward; 1.22 measured on 2 CPU cores).

Computed, not measured: ``siglip_loss_peak_mib_dp<W>``, the peak memory of the loss computation
of ``loss_scope: step`` on one DP rank at the paper's batch (49,152 pairs over ``W`` ranks, i.e.
``n = 49,152 / W`` pairs per rank) and embedding width 1536, fp32, from the chunk sizes of
``losses/siglip.py``: the rank's image + text embeddings (``2·n·d``), their cached gradients
(``2·n·d``), the ring's in-flight text block and its gradient (``2·n·d``), and one row chunk of
logits (``min(n, CHUNK_LOGITS // n) · n``) times the 4 chunk-sized tensors alive in its backward
(product, logits, softplus input, gradient). Printed as ``name=value`` lines.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

PAPER_PAIRS, PAPER_DIM, FP32 = 49_152, 1536, 4
CHUNK_TENSORS = 4  # chunk-sized fp32 tensors alive at once in _chunk_grads' backward


def loss_peak_bytes(pairs: int, dim: int, dp: int) -> int:
    """Analytic peak of the step-scope loss on one rank (see the module docstring)."""
    from megatron_finevit.losses.siglip import CHUNK_LOGITS

    n = pairs // dp
    rows = min(n, max(1, CHUNK_LOGITS // n))
    vectors = 3 * 2 * n * dim  # embeddings, cached gradients, ring block + its gradient
    return FP32 * (vectors + CHUNK_TENSORS * rows * n)


def _time_steps(rank, world_size, root: str, reps: int, global_batch: int) -> dict:
    """Median seconds per train_step of each loss scope, stepped alternately."""
    from megatron_finevit.testing.stage_assets import make_stage_assets, tiny_run
    from megatron_finevit.training.trainer import Trainer

    assets = make_stage_assets(root)
    trainers = {}
    for scope in ("micro_batch", "step"):
        cfg = tiny_run("contrastive", assets, steps=reps + 1, global_batch=global_batch,
                       loss_scope=scope, unfreeze_text_at=0)
        cfg.stage_config["data"]["decoder"] = "pil"
        trainers[scope] = Trainer(cfg)
    times = {scope: [] for scope in trainers}
    for rep in range(reps + 1):
        for scope, trainer in trainers.items():
            start = time.perf_counter()
            trainer.train_step()
            if rep:  # the first step warms up
                times[scope].append(time.perf_counter() - start)
    return {scope: statistics.median(t) for scope, t in times.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=6, help="timed steps per loss scope")
    parser.add_argument("--global-batch", type=int, default=4, help="micro-batches per step")
    args = parser.parse_args()
    from megatron_finevit.testing.multirank import run_world

    with tempfile.TemporaryDirectory(prefix="bench_siglip_") as root:
        (median,) = run_world(_time_steps, 1, args=(root, args.reps, args.global_batch),
                              timeout_s=900)
    for scope, seconds in median.items():
        print(f"step_time_s_{scope}={seconds:.4f}")
    print(f"siglip_step_overhead={median['step'] / median['micro_batch']:.3f}")
    for dp in (128, 1024):
        print(f"siglip_loss_pairs_per_rank_dp{dp}={PAPER_PAIRS // dp}")
        print(f"siglip_loss_peak_mib_dp{dp}="
              f"{loss_peak_bytes(PAPER_PAIRS, PAPER_DIM, dp) / 2**20:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
