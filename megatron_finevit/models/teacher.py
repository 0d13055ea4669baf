"""The frozen DINOv3 teacher of Stage I (paper §3.2): per-patch target features for Eq. 1.

``DINOv3Teacher`` wraps transformers' ``DINOv3ViTModel`` loaded from a local checkpoint directory
(``local_files_only``, no remote code). It is frozen (``requires_grad=False``), stays in eval mode
whatever its parent does (DINOv3 jitters its RoPE coordinates in training mode), and runs under
``torch.no_grad``. Keep it outside the Megatron model so optimizers and checkpoints never see it.

Patch alignment with the student. The student cuts an image of ``H × W`` pixels (multiples of 28)
into a ``gh × gw = H/14 × W/14`` grid; DINOv3's patches are 16 pixels. The teacher's input is the
student's image resized (bilinear, antialiased when shrinking) to ``gh·16 × gw·16``, so its patch
grid is the student's grid and patch ``(r, c)`` of both covers the same region. DINOv3 uses 2D
RoPE over normalised patch-centre coordinates, so any grid shape works, square or not.

Patch order. The student lays patches out merge-window-major (``models.vit.patch_embed``): the
grid is cut into 2×2 windows, windows are taken row by row, and the 4 patches of a window are
consecutive in the order (0,0), (0,1), (1,0), (1,1). DINOv3 emits ``[CLS, registers…, patches]``
with patches row-major; we drop the CLS and register tokens and reorder with
``to_merge_window_order``, so token ``i`` of the teacher is token ``i`` of the student.

Pixel statistics. The data pipeline normalises images with the student's statistics (CLIP's by
default); the teacher undoes that and applies its own (``preprocessor_config.json`` of the
checkpoint if present, else ImageNet's, DINOv3's).

``TeacherFeatureCache`` stores features in a zarr group keyed by sample key, with everything that
determines them (checkpoint fingerprint, resize rule, statistics) in its attributes so a cache
made by another teacher or policy is refused rather than silently reused.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Sequence
from urllib.parse import quote

import numpy as np
import torch
import torch.nn.functional as F

from megatron_finevit.data.decode_pil import Normalization
from megatron_finevit.data.resize import MERGE_FACTOR, PATCH_SIZE

MERGE_SIZE = MERGE_FACTOR // PATCH_SIZE
IMAGENET_NORMALIZATION = Normalization(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
RESIZE_RULE = "bilinear, antialias, align_corners=False, on [0,1] pixels"
CACHE_FORMAT_VERSION = 1


def to_merge_window_order(grid_features: torch.Tensor,
                          merge_size: int = MERGE_SIZE) -> torch.Tensor:
    """Row-major patch grid ``[gh, gw, d]`` -> ``[gh·gw, d]`` in merge-window-major order: windows
    of ``merge × merge`` patches row by row, each window's patches consecutive and row-major."""
    if grid_features.dim() != 3:
        raise ValueError(f"expected grid features [gh, gw, d], got {tuple(grid_features.shape)}")
    gh, gw, d = grid_features.shape
    m = merge_size
    if gh % m or gw % m:
        raise ValueError(f"grid {gh}x{gw} must be a multiple of the {m}x{m} merge window")
    windows = grid_features.reshape(gh // m, m, gw // m, m, d).permute(0, 2, 1, 3, 4)
    return windows.reshape(gh * gw, d)


def checkpoint_fingerprint(local_dir: str | Path) -> str:
    """sha256 over the checkpoint's ``config.json`` and weight files (names and bytes)."""
    local_dir = Path(local_dir)
    files = [local_dir / "config.json"] + sorted(
        p for p in local_dir.iterdir() if p.suffix in (".safetensors", ".bin"))
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode() + b"\0")
        with open(path, "rb") as handle:
            while chunk := handle.read(1 << 24):
                digest.update(chunk)
    return digest.hexdigest()


def _read_normalization(local_dir: Path) -> Normalization:
    config = local_dir / "preprocessor_config.json"
    if not config.is_file():
        return IMAGENET_NORMALIZATION
    stats = json.loads(config.read_text())
    return Normalization(mean=tuple(stats["image_mean"]), std=tuple(stats["image_std"]))


class DINOv3Teacher(torch.nn.Module):
    """Frozen DINOv3 producing per-patch features aligned with the student's patches.

    ``features(images)``: list of student-normalised images ``[3, H_i, W_i]`` (sides multiples
    of 28) -> list of ``[H_i/14 · W_i/14, teacher_dim]`` patch features in the student's
    merge-window-major order, in the model's dtype; ``torch.cat`` of the list lines up row for
    row with ``pack_images(images).patches``. Images of equal size are batched together, at most
    ``max_batch`` per forward.
    """

    def __init__(self, model, input_normalization: Normalization = Normalization(),
                 teacher_normalization: Normalization = IMAGENET_NORMALIZATION,
                 source_dir: str | Path | None = None, max_batch: int = 64):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        patch = model.config.patch_size
        self.patch_size = patch if isinstance(patch, int) else int(patch[0])
        if not isinstance(patch, int) and patch[0] != patch[1]:
            raise ValueError(f"non-square teacher patches {patch} are not supported")
        self.num_prefix_tokens = 1 + model.config.num_register_tokens  # CLS + registers
        self.feature_dim = model.config.hidden_size
        self.input_normalization = input_normalization
        self.teacher_normalization = teacher_normalization
        self.source_dir = Path(source_dir) if source_dir is not None else None
        self.max_batch = max_batch
        # x_teacher = x_student · scale + shift (both normalisations are per-channel affine).
        in_mean, in_std = (torch.tensor(v).view(3, 1, 1) for v in
                           (input_normalization.mean, input_normalization.std))
        t_mean, t_std = (torch.tensor(v).view(3, 1, 1) for v in
                         (teacher_normalization.mean, teacher_normalization.std))
        self.register_buffer("_scale", in_std / t_std, persistent=False)
        self.register_buffer("_shift", (in_mean - t_mean) / t_std, persistent=False)

    @classmethod
    def from_pretrained(cls, local_dir: str | Path, *, dtype: torch.dtype | None = None,
                        device: torch.device | str | None = None,
                        input_normalization: Normalization = Normalization(),
                        max_batch: int = 64) -> "DINOv3Teacher":
        """Load a transformers DINOv3 ViT checkpoint directory (never from the network)."""
        from transformers import DINOv3ViTModel

        local_dir = Path(local_dir)
        if not (local_dir / "config.json").is_file():
            raise FileNotFoundError(
                f"teacher checkpoint {local_dir} has no config.json: give the local directory of "
                f"a transformers DINOv3 ViT checkpoint (e.g. a download of "
                f"facebook/dinov3-vitl16-pretrain-lvd1689m)")
        model = DINOv3ViTModel.from_pretrained(local_dir, local_files_only=True, dtype=dtype)
        teacher = cls(model, input_normalization, _read_normalization(local_dir),
                      source_dir=local_dir, max_batch=max_batch)
        return teacher.to(device) if device is not None else teacher

    def train(self, mode: bool = True) -> "DINOv3Teacher":
        """The teacher never leaves eval mode (a parent's ``.train()`` must not turn on DINOv3's
        RoPE jitter or dropout)."""
        return super().train(False)

    def student_grid(self, image: torch.Tensor) -> tuple[int, int]:
        """Student patch grid ``(gh, gw)`` of a ``[3, H, W]`` image."""
        if image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"expected an image [3, H, W], got {tuple(image.shape)}")
        height, width = image.shape[1:]
        if height % MERGE_FACTOR or width % MERGE_FACTOR or not height or not width:
            raise ValueError(f"image of {height}x{width} pixels: sides must be positive multiples "
                             f"of {MERGE_FACTOR} (the student's grid); use smart_resize first")
        return height // PATCH_SIZE, width // PATCH_SIZE

    def teacher_input(self, images: torch.Tensor) -> torch.Tensor:
        """Student-normalised ``[n, 3, gh·14, gw·14]`` -> teacher pixels ``[n, 3, gh·P, gw·P]``.

        The per-channel renormalisation is affine and bilinear weights sum to one, so it commutes
        with the resize; applying it first keeps the resize on the teacher's own scale."""
        gh, gw = images.shape[-2] // PATCH_SIZE, images.shape[-1] // PATCH_SIZE
        pixels = images.float() * self._scale + self._shift
        size = (gh * self.patch_size, gw * self.patch_size)
        return F.interpolate(pixels, size=size, mode="bilinear", align_corners=False,
                             antialias=True)

    @torch.no_grad()
    def features(self, images: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """See the class docstring."""
        out: list[torch.Tensor | None] = [None] * len(images)
        by_size: dict[tuple[int, ...], list[int]] = defaultdict(list)
        for i, image in enumerate(images):
            self.student_grid(image)  # validates
            by_size[tuple(image.shape)].append(i)
        device = self._scale.device
        dtype = next(self.model.parameters()).dtype
        for (_, height, width), indices in by_size.items():
            gh, gw = height // PATCH_SIZE, width // PATCH_SIZE
            for start in range(0, len(indices), self.max_batch):
                chunk = indices[start:start + self.max_batch]
                batch = torch.stack([images[i] for i in chunk]).to(device)
                pixels = self.teacher_input(batch).to(dtype)
                patches = self.model(pixel_values=pixels).last_hidden_state
                patches = patches[:, self.num_prefix_tokens:]  # drop CLS + register tokens
                if patches.shape[1] != gh * gw:
                    raise RuntimeError(f"teacher produced {patches.shape[1]} patch tokens for a "
                                       f"{gh}x{gw} grid")
                for i, grid in zip(chunk, patches.reshape(len(chunk), gh, gw, -1)):
                    out[i] = to_merge_window_order(grid)
        return out

    @functools.cached_property
    def fingerprint(self) -> str:
        """``checkpoint_fingerprint`` of the checkpoint directory (read once, on first use: it
        hashes the weight files)."""
        if self.source_dir is None:
            raise ValueError("this teacher was not loaded from a checkpoint directory, so it "
                             "has no fingerprint for a feature cache")
        return checkpoint_fingerprint(self.source_dir)

    def cache_signature(self) -> dict:
        """Everything that determines the features, recorded in (and checked against) a cache."""
        return {
            "format_version": CACHE_FORMAT_VERSION,
            "teacher_fingerprint": self.fingerprint,
            "teacher_patch_size": self.patch_size,
            "student_patch_size": PATCH_SIZE,
            "patch_order": f"merge-window-major {MERGE_SIZE}x{MERGE_SIZE}",
            "resize": RESIZE_RULE,
            "input_normalization": _norm_dict(self.input_normalization),
            "teacher_normalization": _norm_dict(self.teacher_normalization),
            "feature_dim": self.feature_dim,
        }

    def cached_features(self, images: Sequence[torch.Tensor], keys: Sequence[str],
                        cache: "TeacherFeatureCache") -> list[torch.Tensor]:
        """``features`` through ``cache``: hits are read, misses computed and written. Every
        result goes through the cache's storage dtype, so a sample's targets are the same
        whether they were just computed or read back."""
        if len(images) != len(keys):
            raise ValueError(f"{len(images)} images but {len(keys)} keys")
        device = self._scale.device
        dtype = next(self.model.parameters()).dtype
        out = [cache.get(key, self.student_grid(img)) for key, img in zip(keys, images)]
        misses = [i for i, hit in enumerate(out) if hit is None]
        for i, computed in zip(misses, self.features([images[i] for i in misses])):
            out[i] = cache.put(keys[i], self.student_grid(images[i]), computed)
        return [t.to(device=device, dtype=dtype) for t in out]


def _norm_dict(norm: Normalization) -> dict:
    return {"mean": list(norm.mean), "std": list(norm.std)}


class StaleTeacherCacheError(RuntimeError):
    """The cache on disk was made with a different teacher, resize rule or statistics."""


class TeacherFeatureCache:
    """Teacher features in a zarr group: one ``[n_patches, d]`` array per sample key (chunked as
    one piece, compressed), with the sample's student grid in the array's attributes and the
    teacher's ``cache_signature()`` in the group's.

    ``get(key, grid) -> [n, d] float32 | None`` (None also when the stored grid differs, e.g. the
    resize policy changed); ``put(key, grid, features) -> the stored values as float32``.
    Keys are percent-encoded into array names (a ``/`` in a key stays one array).

    Several ranks may share one cache if they write different keys; create it once (e.g. on rank
    0, then a barrier) before the others open it.
    """

    def __init__(self, path: str | Path, signature: dict, dtype: str = "float16"):
        import zarr

        self.path = Path(path)
        self.dtype = np.dtype(dtype)
        signature = dict(signature, storage_dtype=self.dtype.name)
        if (self.path / "zarr.json").exists():
            self.group = zarr.open_group(self.path, mode="r+")
            stored = dict(self.group.attrs)
            if stored != json.loads(json.dumps(signature)):
                changed = sorted(k for k in set(stored) | set(signature)
                                 if stored.get(k) != json.loads(json.dumps(signature.get(k))))
                raise StaleTeacherCacheError(
                    f"teacher feature cache {self.path} was made with different {changed}; "
                    f"delete it or point the cache elsewhere")
        else:
            self.group = zarr.open_group(self.path, mode="w-")
            self.group.attrs.update(signature)

    @staticmethod
    def _name(key: str) -> str:
        return "s_" + quote(key, safe="")

    def get(self, key: str, grid: tuple[int, int]) -> torch.Tensor | None:
        name = self._name(key)
        if name not in self.group:
            return None
        array = self.group[name]
        if list(array.attrs.get("grid", [])) != list(grid):
            return None
        return torch.from_numpy(array[...].astype(np.float32))

    def put(self, key: str, grid: tuple[int, int], features: torch.Tensor) -> torch.Tensor:
        if features.dim() != 2 or features.shape[0] != math.prod(grid):
            raise ValueError(f"features {tuple(features.shape)} do not match grid {grid}")
        values = features.detach().float().cpu().numpy().astype(self.dtype)
        array = self.group.create_array(self._name(key), shape=values.shape, dtype=self.dtype,
                                        chunks=values.shape, overwrite=True)
        array[...] = values
        array.attrs["grid"] = list(grid)
        return torch.from_numpy(values.astype(np.float32))
