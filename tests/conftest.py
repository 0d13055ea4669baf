"""Shared pytest configuration.

Multi-rank tests use ``megatron_finevit.testing.multirank.run_world``; group several checks in
one spawned world (module-scoped fixtures) so megatron's ~7 s import is paid once per world.
"""

import importlib.util
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Keep BLAS from oversubscribing the 2-core CI machine when ranks run side by side.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# glibc's malloc on transparent huge pages in every process the tests start (the forkserver the
# multi-rank worlds fork from, CLI subprocesses), as examples/cpu_quickstart.sh does: tiny models
# with Qwen3's 151,936-row vocabulary allocate and free tens of MB per step (README, "megatron-core
# on CPU"). Read by glibc at process start, so this process itself is unaffected.
os.environ.setdefault("GLIBC_TUNABLES", "glibc.malloc.hugetlb=1")


@pytest.fixture
def convert_tool():
    """``tools/convert_checkpoint.py``'s ``main(argv) -> exit code``, run in this process (the
    error paths and small exports need no subprocess)."""
    spec = importlib.util.spec_from_file_location("convert_checkpoint",
                                                  REPO / "tools" / "convert_checkpoint.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    def run(*args: str) -> int:
        return module.main(list(args))

    return run
