"""Where the code runs: device and backend, distributed init (torchrun / Slurm), megatron parallel
state, seeding, and the megatron-core CPU compatibility layer."""

from megatron_finevit.platform.device import Backend, detect_backend
from megatron_finevit.platform.distributed import (
    DistEnv,
    collective_device,
    dist_env_from_environ,
    init_distributed,
)
from megatron_finevit.platform.parallel import ParallelConfig, destroy_parallel, init_parallel
from megatron_finevit.platform.seed import set_seed

__all__ = [
    "Backend",
    "detect_backend",
    "DistEnv",
    "dist_env_from_environ",
    "collective_device",
    "init_distributed",
    "ParallelConfig",
    "init_parallel",
    "destroy_parallel",
    "set_seed",
]
