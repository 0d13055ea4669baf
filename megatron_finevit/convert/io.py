"""Hugging Face checkpoint files: a streaming safetensors reader, a sharding writer, and atomic
publication of an output directory.

Memory stays bounded: the reader memory-maps files and materialises one tensor at a time; the
writer holds at most one output shard (``max_shard_bytes``) before writing it.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                   "special_tokens_map.json", "added_tokens.json", "generation_config.json")


def _umask() -> int:
    """The process umask (reading it means setting it: briefly to the most private mask)."""
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


class SafetensorsReader:
    """Tensors of an HF checkpoint directory (``model.safetensors`` or an index + shards)."""

    def __init__(self, hf_dir: str | os.PathLike):
        from safetensors import safe_open

        self.dir = Path(hf_dir)
        if (self.dir / INDEX_FILE).exists():
            weight_map = json.loads((self.dir / INDEX_FILE).read_text())["weight_map"]
        elif (self.dir / SINGLE_FILE).exists():
            weight_map = None
        else:
            raise FileNotFoundError(f"{self.dir} has neither {SINGLE_FILE} nor {INDEX_FILE}")
        files = sorted(set(weight_map.values())) if weight_map else [SINGLE_FILE]
        self._handles = {}
        self._file_of: dict[str, str] = {}
        for name in files:
            path = self.dir / name
            if not path.exists():
                raise FileNotFoundError(f"{path} is listed in {INDEX_FILE} but missing")
            self._handles[name] = safe_open(str(path), framework="pt")
            for key in self._handles[name].keys():
                self._file_of[key] = name
        if weight_map:
            absent = sorted(k for k, f in weight_map.items() if self._file_of.get(k) != f)
            if absent:
                raise ValueError(f"{INDEX_FILE} lists tensors not in their files: {absent[:5]}")

    def keys(self) -> list[str]:
        return sorted(self._file_of)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handles[self._file_of[name]].get_slice(name).get_shape())

    def get(self, name: str) -> torch.Tensor:
        return self._handles[self._file_of[name]].get_tensor(name)

    def dtypes(self) -> set[torch.dtype]:
        names = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
                 "F64": torch.float64}
        found = set()
        for key, file in self._file_of.items():
            code = self._handles[file].get_slice(key).get_dtype()
            found.add(names.get(code, code))
        return found


class ShardedSafetensorsWriter:
    """Writes tensors in arrival order into shards of at most ``max_shard_bytes`` (a single
    tensor larger than that gets a shard of its own), named as ``save_pretrained`` names them:
    ``model.safetensors`` when one shard suffices, else ``model-0000i-of-0000N.safetensors`` plus
    ``model.safetensors.index.json``."""

    def __init__(self, out_dir: str | os.PathLike, max_shard_bytes: int = 4 * 2**30):
        self.dir = Path(out_dir)
        self.max_shard_bytes = max_shard_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[list[str]] = []  # tensor names per written shard
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._pending or any(name in s for s in self._shards):
            raise ValueError(f"tensor {name} written twice")
        size = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + size > self.max_shard_bytes:
            self._flush()
        # clone: a view would keep its (larger) source alive and safetensors refuses shared storage
        self._pending[name] = tensor.detach().contiguous().clone()
        self._pending_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        from safetensors.torch import save_file

        path = self.dir / f"shard-{len(self._shards)}.tmp"
        save_file(self._pending, str(path), metadata={"format": "pt"})
        path.chmod(0o666 & ~_umask())  # safetensors writes 0600; exports are shared
        self._shards.append(list(self._pending))
        self._pending, self._pending_bytes = {}, 0

    def close(self) -> list[str]:
        """Write the last shard, give shards their final names; returns the file names."""
        if self._pending:
            self._flush()
        n = len(self._shards)
        if n == 1:
            names = [SINGLE_FILE]
        else:
            names = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        for i, name in enumerate(names):
            os.replace(self.dir / f"shard-{i}.tmp", self.dir / name)
        if n > 1:
            index = {"metadata": {"total_size": self.total_bytes},
                     "weight_map": {t: names[i] for i, shard in enumerate(self._shards) for t in shard}}
            (self.dir / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        return names


def copy_tokenizer_files(src_dir: str | os.PathLike, dst_dir: str | os.PathLike) -> list[str]:
    """Copy the tokenizer files present in ``src_dir``; raise if there are none."""
    src = Path(src_dir)
    present = [n for n in TOKENIZER_FILES if (src / n).is_file()]
    if not present:
        raise FileNotFoundError(f"no tokenizer files ({', '.join(TOKENIZER_FILES)}) in {src}")
    for name in present:  # contents only: a private source file's mode must not carry over
        shutil.copyfile(src / name, Path(dst_dir) / name)
    return present


def check_output_dir(final_dir: str | os.PathLike, overwrite: bool) -> Path:
    """Fail early (before any compute) if the output exists and may not be replaced."""
    final = Path(final_dir).resolve()
    if final.exists() and not overwrite:
        raise FileExistsError(f"{final} exists; pass --overwrite to replace it")
    return final


def _fresh_dir(parent: Path, prefix: str) -> Path:
    """A new, uniquely named directory in ``parent`` with mkdir's umask-respecting mode (0755
    under umask 022): clusters share model directories, and ``tempfile.mkdtemp`` makes 0700."""
    while True:
        path = parent / f"{prefix}{secrets.token_hex(6)}"
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue


@contextmanager
def staged_output(final_dir: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty staging directory beside ``final_dir``; on success it is renamed to
    ``final_dir`` (an atomic rename on one filesystem), on any exception it is deleted, so a failed
    conversion never leaves a half-written output."""
    final = check_output_dir(final_dir, overwrite)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = _fresh_dir(final.parent, f".{final.name}.partial-")
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if final.exists():  # overwrite: move the old output aside first, delete it after the swap
        old = _fresh_dir(final.parent, f".{final.name}.old-")
        os.replace(final, old / "previous")
        os.replace(staging, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, final)
