"""``tools/bench_malloc.py`` as a user runs it, with tiny sizes: it exits 0 and prints both
settings' step times and kernel shares and one parsable ``malloc_hugetlb_speedup=`` line (the
README quotes it), and the same result under both allocators. Timing is never asserted."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_bench_malloc_runs_and_prints_a_parsable_ratio():
    proc = subprocess.run(
        [sys.executable, "tools/bench_malloc.py", "--tokens", "8", "--hidden", "16", "--vocab",
         "5000", "--steps", "2", "--reps", "1"],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(r"^default malloc +\d+\.\d ms/step +kernel +\d+\.\d% of CPU$",
                     proc.stdout, re.M), proc.stdout
    assert re.search(r"^GLIBC_TUNABLES=glibc\.malloc\.hugetlb=1 +\d+\.\d ms/step +kernel",
                     proc.stdout, re.M), proc.stdout
    ratio = re.search(r"^malloc_hugetlb_speedup=(\d+\.\d\d)$", proc.stdout, re.M)
    assert ratio and float(ratio.group(1)) > 0, proc.stdout
    # the same arithmetic under either allocator, to the bit
    assert re.search(r"^malloc_hugetlb_result_abs_diff=0$", proc.stdout, re.M), proc.stdout

