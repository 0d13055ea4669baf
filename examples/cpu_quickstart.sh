#!/usr/bin/env bash
# The CPU quick start: a tiny end-to-end run on 2 CPU ranks (gloo).
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
.venv/bin/torchrun --nproc-per-node 2 tools/smoke_parallel.py --tp 2 --sequence-parallel --steps 30
