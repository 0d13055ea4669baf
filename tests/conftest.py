"""Shared pytest configuration.

Multi-rank tests use ``megatron_finevit.testing.multirank.run_world``; group several checks in
one spawned world (module-scoped fixtures) so megatron's ~7 s import is paid once per world.
"""

import os

# Keep BLAS from oversubscribing the 2-core CI machine when ranks run side by side.
os.environ.setdefault("OMP_NUM_THREADS", "1")
