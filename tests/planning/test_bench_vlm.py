"""``tools/bench_vlm.py`` as a user runs it, with tiny settings: it exits 0 and every
``name=value`` line it prints parses, with the names the README quotes. Timing is never
asserted; the loss comparison (same weights through the converter, same samples) is."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TINY = ("--steps", "1", "--warmup", "0", "--dp-steps", "5", "--dp-samples-per-rank", "100",
        "--width", "64", "--llm-width", "64", "--vit-layers", "1", "--llm-layers", "1",
        "--vocab", "512", "--llm-tokens", "1024", "--vit-tokens", "2048",
        "--max-pixels", str(448 * 448))
NAMES = {"vlm_tokens_per_s_ours", "vlm_tokens_per_s_hf", "vlm_ratio_vs_hf", "dp_imbalance",
         "dp_imbalance_naive", "vlm_loss_abs_diff"}


def test_bench_vlm_runs_and_prints_parsable_values():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "tools/bench_vlm.py", *TINY], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    values = {}
    for line in proc.stdout.splitlines():
        if "=" in line:
            match = re.fullmatch(r"([a-z0-9_]+)=(\S+)", line.strip())
            assert match, line
            values[match[1]] = float(match[2])
    assert NAMES <= set(values), sorted(values)
    assert values["vlm_loss_abs_diff"] < 1e-4  # both sides ran the same model on the same data
    assert values["dp_imbalance"] >= 1.0 and values["dp_imbalance_naive"] >= 1.0
    # the docstring's claim: Qwen3's output layer is ~18% (1.7B) / ~8% (8B) of the LLM's FLOPs
    # (hand count: 2048·151808 / (28·50.3M + 2048·151808); 4096·151808 / (36·193M + ...))
    assert 0.17 < values["output_layer_share_finevit_vl_1p7b"] < 0.19
    assert 0.07 < values["output_layer_share_finevit_vl_8b"] < 0.09


def test_bench_vlm_help():
    proc = subprocess.run([sys.executable, "tools/bench_vlm.py", "--help"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "--dp-steps" in proc.stdout, proc.stderr
