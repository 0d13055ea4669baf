"""megatron ``dist_checkpointing`` (torch_dist) checkpoints, read and written for conversion.

A torch_dist checkpoint stores every tensor in its *global* (TP = 1, unsplit) layout with the
layers of a block stacked on a leading axis; each rank writes and reads only its own slices. So a
checkpoint is independent of the TP / PP layout it was saved at, and megatron reshards at load.

Writing (``hf-to-mcore``) builds the whole model once, at TP = PP = 1, in one process — one copy
of the weights in the target dtype, initialisation skipped — fills it tensor by tensor from the
streamed HF files and saves it with megatron's own ``sharded_state_dict`` (so the keys, the layer
stacking and the gated-MLP layout are megatron's, not re-implemented here).

Reading (``mcore-to-hf``) needs neither a model nor a process group: ``MegatronCheckpointReader``
reads the torch.distributed.checkpoint files directly, one layer's slices at a time, so the peak
is one layer plus the embedding table, whatever TP / PP the checkpoint was written at.
"""

from __future__ import annotations

import json
import os
import socket
import warnings
from pathlib import Path
from contextlib import contextmanager
from datetime import timedelta
from typing import Iterator

import torch
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint import load as dcp_load
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadPlan
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

CheckpointKey = tuple[str, "int | None"]  # (dist_checkpointing key, layer index or None)


@contextmanager
def single_rank_world() -> Iterator[None]:
    """A 1-rank gloo world with megatron's TP = PP = 1 groups (what megatron's model and
    checkpoint code need), unless the caller already set one up."""
    import torch.distributed as dist

    from megatron_finevit.platform import ParallelConfig, init_parallel
    from megatron_finevit.platform.parallel import destroy_parallel

    owned = not dist.is_initialized()
    if owned:
        if not torch.cuda.is_available():
            from megatron_finevit.platform.megatron_cpu_compat import apply_cpu_compat

            apply_cpu_compat()
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0,
                                world_size=1, timeout=timedelta(minutes=30))
    elif dist.get_world_size() != 1:
        raise RuntimeError("checkpoint conversion runs in one process; found a world of "
                           f"{dist.get_world_size()} ranks")
    init_parallel(ParallelConfig())
    try:
        yield
    finally:
        destroy_parallel()
        if owned:
            dist.destroy_process_group()


def checkpoint_tensors(model) -> dict[CheckpointKey, torch.Tensor]:
    """This rank's tensors of ``model`` keyed as in its checkpoint: (key, global layer index) for
    layer-stacked tensors, (key, None) otherwise. Values are the parameters themselves (the
    local TP shard; on the last pipeline stage of a tied model the output layer appears under the
    embedding's key, as megatron saves it)."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    result: dict[CheckpointKey, torch.Tensor] = {}
    for entry in model.sharded_state_dict().values():
        if isinstance(entry, ShardedTensorFactory):
            built = entry.build()
            sharded = next(iter(built.values())) if isinstance(built, dict) else built[0]
            data = entry.data
        elif isinstance(entry, ShardedTensor):
            sharded, data = entry, entry.data
        else:  # ShardedObject (_extra_state) etc.
            continue
        layer = sharded.global_offset[0] if sharded.prepend_axis_num else None
        key = (sharded.key, layer)
        if key in result:
            raise RuntimeError(f"two model tensors share checkpoint key {key}")
        result[key] = data
    return result


def save_model_checkpoint(model, out_dir: str | os.PathLike) -> None:
    """megatron dist_checkpointing save of the model's weights (torch_dist)."""
    from megatron.core import dist_checkpointing

    dist_checkpointing.save(model.sharded_state_dict(), str(out_dir))


class MegatronCheckpointReader:
    """Model-free, process-free access to a torch_dist checkpoint's tensors (global layout).

    megatron's torch_dist format is a torch.distributed.checkpoint (DCP) directory whose tensor
    keys are the ShardedTensor keys. Reading a slice of a stored tensor is a DCP load plan for
    that chunk only (``_SliceLoadPlanner``), so one layer of a layer-stacked tensor costs one
    layer of memory. No process group is needed.
    """

    def __init__(self, ckpt_dir: str | os.PathLike, prefix: str = ""):
        """``prefix``: read the model stored under this key prefix (e.g. ``"encoder."`` for the
        FineViT inside a Stage I/II checkpoint); keys are reported without it."""
        self.dir = str(ckpt_dir)
        self.prefix = prefix
        if not os.path.isfile(os.path.join(self.dir, "metadata.json")):
            raise FileNotFoundError(f"{self.dir} is not a megatron dist_checkpointing directory "
                                    "(no metadata.json)")
        backend = json.loads(Path(self.dir, "metadata.json").read_text()).get("sharded_backend")
        if backend != "torch_dist":
            raise ValueError(f"{self.dir}: sharded_backend {backend!r}, expected 'torch_dist'")
        metadata = FileSystemReader(self.dir).read_metadata().state_dict_metadata
        self._tensors = {k[len(prefix):]: v for k, v in metadata.items()
                         if isinstance(v, TensorStorageMetadata) and k.startswith(prefix)}

    def keys(self) -> list[str]:
        return sorted(self._tensors)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._tensors[key].size)

    def dtype(self, key: str) -> torch.dtype:
        return self._tensors[key].properties.dtype

    def load(self, requests: list[CheckpointKey]) -> dict[CheckpointKey, torch.Tensor]:
        """Read the requested tensors: (key, layer) gives one layer's slice ``[...]`` of a stacked
        ``[L, ...]`` tensor, (key, None) the whole tensor."""
        buffers, offsets = {}, {}
        for key, layer in requests:
            if key in buffers:
                raise ValueError(f"one load() reads one slice per key; {key} requested twice")
            shape = self.shape(key)
            if layer is None:
                buffers[key] = torch.empty(shape, dtype=self.dtype(key))
                offsets[key] = (0,) * len(shape)
            else:
                if not 0 <= layer < shape[0]:
                    raise IndexError(f"{key}: layer {layer} outside 0..{shape[0] - 1}")
                buffers[key] = torch.empty((1, *shape[1:]), dtype=self.dtype(key))
                offsets[key] = (layer,) + (0,) * (len(shape) - 1)
        # no_dist: a read by this process alone, even inside a distributed job
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single")
            dcp_load({self.prefix + k: v for k, v in buffers.items()},
                     storage_reader=FileSystemReader(self.dir),
                     planner=_SliceLoadPlanner({self.prefix + k: v for k, v in offsets.items()}),
                     no_dist=True)
        return {(key, layer): buffers[key] if layer is None else buffers[key][0]
                for key, layer in requests}


class _SliceLoadPlanner(DefaultLoadPlanner):
    """DCP load planner that fills each destination tensor from the chunk of the stored tensor
    starting at ``offsets[key]`` (DCP's default planner reads whole tensors, or the caller's own
    shards of a distributed tensor)."""

    def __init__(self, offsets: dict[str, tuple[int, ...]]):
        super().__init__()
        self.offsets = offsets

    def create_local_plan(self) -> LoadPlan:
        items = []
        for key, dest in self.state_dict.items():
            chunk = ChunkStorageMetadata(offsets=torch.Size(self.offsets[key]), sizes=dest.size())
            items += create_read_items_for_chunk_list(
                key, self.metadata.state_dict_metadata[key], [chunk])
        return LoadPlan(items)

    def lookup_tensor(self, index) -> torch.Tensor:
        return self.state_dict[index.fqn]  # the destination is the chunk itself
