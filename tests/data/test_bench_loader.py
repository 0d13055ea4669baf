"""``tools/bench_loader.py`` as a user runs it, with tiny settings: it exits 0 and prints, for
each resolution asked, both decoders' rates and one parsable ``loader_dali_vs_pil_<side>=`` line
(the README quotes them). Timing is never asserted."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_bench_loader_runs_and_prints_parsable_ratios():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "tools/bench_loader.py", "--num-images", "24", "--packs", "2",
         "--reps", "1", "--resolutions", "256", "448"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ratios = dict(re.findall(r"^loader_dali_vs_pil_(\d+)=(\d+\.\d+)$", proc.stdout, re.M))
    assert set(ratios) == {"256", "448"} and all(float(r) > 0 for r in ratios.values())
    for side in ("256", "448"):
        for decoder in ("pil ", "dali"):
            assert re.search(rf"^{side}² {decoder}: +\d+\.\d images/s +\d+ tokens/s$",
                             proc.stdout, re.M), (side, decoder, proc.stdout)
