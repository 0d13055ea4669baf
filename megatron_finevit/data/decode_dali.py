"""NVIDIA DALI decoder: the production path, equal in sizes to the PIL reference decoder.

Pipeline per data-parallel rank (one DALI pipeline, ragged output):

    fn.readers.webdataset(shards, dali_index/*.idx, shard_id=dp_rank, num_shards=dp_size)
      ├─ fn.peek_image_shape ─ fn.python_function(smart_resize)  → exact [H, W] target (CPU)
      └─ fn.decoders.image(device="mixed" on GPU / "cpu")
           ─ fn.resize(size=target, INTERP_LINEAR, antialias)            (same filter as PIL's
           ─ fn.crop_mirror_normalize(mean, std, CHW, float32)            BILINEAR when shrinking)
    → list of torch tensors [3, H_i, W_i] + sample keys + metadata

The target size comes from `smart_resize` itself (integer arithmetic, in a python_function on
the header shape), not from DALI float arithmetic: a float32 ceil/floor on e.g. 27.999998 would
give a size one patch row off the PIL path and the index. The reader uses the index files written
by `build_index`, which list only samples whose header passed the checks, so DALI never sees a
sample the PIL path would skip for size/JSON reasons; a JPEG corrupt *after* its header still
makes DALI raise (the PIL path skips it) — re-run curation on such data.

Sample split across data-parallel ranks: DALI's contiguous split, identical to `dp_partition`.

Devices: `device="mixed"` (nvJPEG decode, resize/normalise on GPU) is chosen when CUDA is
available; it is not exercised in CI (no GPU there). On CPU `device_id=None`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator

import numpy as np
import torch

from megatron_finevit.data.bad_samples import BadSampleCounter
from megatron_finevit.data.decode_pil import Normalization
from megatron_finevit.data.index import dali_index_path, dp_partition, load_index
from megatron_finevit.data.resize import ResizePolicy
from megatron_finevit.data.shards import IMAGE_EXTS, split_member_name, validate_meta


def default_device() -> str:
    return "mixed" if torch.cuda.is_available() else "cpu"


class DaliDecoder:
    """Iterate decoded samples of an indexed shard directory, one epoch per `__iter__`.

    Args:
        shard_dir: directory holding the shards, `index.zarr` and `dali_index/` (build_index).
        policy: resize policy; must equal the one the index was built with (checked).
        batch_size: samples per DALI batch (a memory/throughput knob, not the training batch).
        device: "cpu" or "mixed" (GPU decode); default: "mixed" iff CUDA is available.
        dp_rank, dp_size: this rank's share of the samples (`dp_partition`).
        shuffle, seed: DALI's reader shuffling (a shuffle buffer of `shuffle_buffer` samples).

    Yields batches as lists of `(key, pixels [3, H, W] float32, meta)`.
    """

    def __init__(self, shard_dir, policy: ResizePolicy = ResizePolicy(),
                 norm: Normalization = Normalization(), batch_size: int = 16,
                 num_threads: int = 2, device: str | None = None, dp_rank: int = 0,
                 dp_size: int = 1, shuffle: bool = False, seed: int = 0,
                 shuffle_buffer: int = 1024):
        index = load_index(shard_dir, policy)
        used = sorted({int(s) for s in index.shard_id})  # shards with >= 1 usable sample
        if not used:
            raise ValueError(f"the index of {shard_dir} holds no usable sample")
        self.paths = [str(index.shard_dir / index.shards[s]) for s in used]
        self.index_paths = [str(dali_index_path(shard_dir, index.shards[s])) for s in used]
        self.policy, self.norm = policy, norm
        self.batch_size = batch_size
        self.num_samples = len(dp_partition(len(index), dp_rank, dp_size))
        self.device = device or default_device()
        if self.device not in ("cpu", "mixed"):
            raise ValueError(f"device must be 'cpu' or 'mixed', got {self.device!r}")
        self.counter = BadSampleCounter(name="decode_dali")  # counts dropped boxes
        self._pipe = self._build(num_threads, dp_rank, dp_size, shuffle, seed, shuffle_buffer)

    def _target_size(self, shape: np.ndarray) -> np.ndarray:
        """[H, W, C] header shape → float32 [H, W] target (exact integers from smart_resize)."""
        return np.asarray(self.policy.target_size(int(shape[0]), int(shape[1])), np.float32)

    def _build(self, num_threads, dp_rank, dp_size, shuffle, seed, shuffle_buffer):
        from nvidia.dali import fn, pipeline_def, types

        device_id = torch.cuda.current_device() if self.device == "mixed" else None

        @pipeline_def(batch_size=self.batch_size, num_threads=num_threads, device_id=device_id,
                      seed=seed)
        def pipeline():
            encoded, meta_json = fn.readers.webdataset(
                paths=self.paths, index_paths=self.index_paths, ext=[";".join(IMAGE_EXTS), "json"],
                missing_component_behavior="error", shard_id=dp_rank, num_shards=dp_size,
                random_shuffle=shuffle, initial_fill=shuffle_buffer, pad_last_batch=True,
                name="reader")
            target = fn.python_function(fn.peek_image_shape(encoded), function=self._target_size,
                                        batch_processing=False)
            decoded = fn.decoders.image(encoded, device=self.device, output_type=types.RGB)
            resized = fn.resize(decoded, size=target, interp_type=types.INTERP_LINEAR,
                                antialias=True)
            pixels = fn.crop_mirror_normalize(
                resized, dtype=types.FLOAT, output_layout="CHW",
                mean=[255.0 * m for m in self.norm.mean], std=[255.0 * s for s in self.norm.std])
            return pixels, meta_json

        pipe = pipeline()
        pipe.build()
        return pipe

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[list[tuple[str, torch.Tensor, dict]]]:
        remaining = self.num_samples
        for _ in range(math.ceil(self.num_samples / self.batch_size)):
            pixels, meta_json = self._pipe.run()
            batch = []
            for i in range(min(remaining, self.batch_size)):  # the last batch is padded
                key = split_member_name(pixels[i].source_info().rsplit(":", 1)[-1])[0]
                meta = validate_meta(json.loads(bytes(np.asarray(meta_json[i]))), self.counter,
                                     member=key)
                # DALI reuses its output buffers on the next run(): copy out.
                batch.append((key, torch.from_dlpack(pixels[i]).clone(), meta))
            remaining -= len(batch)
            yield batch
