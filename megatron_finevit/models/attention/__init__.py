"""Core attention for packed sequences (THD) and context parallelism, CPU and GPU.

- ``PackedCoreAttention``: megatron ``core_attention`` submodule (local spec).
- ``packed_attention``: the same computation as a function.
- ``context_parallel``: the CP token layout (``partition_for_cp``, ``cp_cu_seqlens``,
  ``gather_from_cp``, ...) and the differentiable K/V all-gather.
"""

from megatron_finevit.models.attention.context_parallel import (
    all_gather_cp,
    cp_cu_seqlens,
    cp_padded_length,
    cp_partition_index,
    gather_from_cp,
    merge_cp_partitions,
    partition_for_cp,
)
from megatron_finevit.models.attention.kernels import AttentionBlocks, attend_blocks
from megatron_finevit.models.attention.packed import PackedCoreAttention, packed_attention

__all__ = [
    "PackedCoreAttention",
    "packed_attention",
    "AttentionBlocks",
    "attend_blocks",
    "all_gather_cp",
    "cp_cu_seqlens",
    "cp_padded_length",
    "cp_partition_index",
    "gather_from_cp",
    "merge_cp_partitions",
    "partition_for_cp",
]
