"""transformers image processor for FineViT / FineViT-VL: the training pipeline's image path.

Each image goes through the functions the training data loader uses, in the same order::

    PIL image (or uint8 array) ─ upright RGB (``decode_pil.load_rgb``: EXIF orientation, alpha
        dropped) ─ ``smart_resize`` target (``ResizePolicy``) ─ Pillow BILINEAR resize and
        ``(x / 255 - mean) / std`` (``decode_pil.resize_and_normalize``)
        ─ merge-window-major patches (``pack_images``)

so a photo gives bit for bit the ``pixel_values`` the model saw in training. The defaults are the
Stage III / SFT policy (``STAGE_MAX_PIXELS["align"]``, images within 1000×1000 pixels, aspect
ratio at most 3) and the CLIP statistics of ``Normalization``.

Output (``FineViTVLForConditionalGeneration``'s image inputs): ``pixel_values`` float32
``[N, 3·14·14]``, the patches of every image back to back, and ``image_grid_thw`` int64
``[n, 3]``, one ``(1, h, w)`` row of patch rows and columns per image (``N = Σ h·w``).
"""

from __future__ import annotations

import torch
from PIL import Image
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature
from transformers.image_transforms import to_pil_image
from transformers.image_utils import make_flat_list_of_images
from transformers.processing_utils import ImagesKwargs

from megatron_finevit.data.decode_pil import Normalization, load_rgb, resize_and_normalize
from megatron_finevit.data.resize import STAGE_MAX_PIXELS, ResizePolicy

ALIGN_POLICY = ResizePolicy(max_pixels=STAGE_MAX_PIXELS["align"])  # Stage III and SFT
_NORM = Normalization()


class FineViTImagesKwargs(ImagesKwargs, total=False):
    """Per-call overrides of the resize policy (``ResizePolicy``'s fields)."""

    min_pixels: int
    max_pixels: int
    max_aspect_ratio: float


class FineViTImageProcessor(BaseImageProcessor):
    """Images -> ``pixel_values`` ``[N, 588]`` + ``image_grid_thw`` ``[n, 3]`` (module docstring).

    Args:
        min_pixels / max_pixels / max_aspect_ratio: the ``ResizePolicy`` bounds.
        patch_size / merge_size: the encoder's patch side and the projector's merge window; sides
            are resized to multiples of ``patch_size · merge_size``.
        image_mean / image_std: per-channel statistics on the [0, 1] scale (RGB).
    """

    model_input_names = ["pixel_values", "image_grid_thw"]
    valid_kwargs = FineViTImagesKwargs

    def __init__(self, min_pixels: int = ALIGN_POLICY.min_pixels,
                 max_pixels: int = ALIGN_POLICY.max_pixels,
                 max_aspect_ratio: float = ALIGN_POLICY.max_aspect_ratio,
                 patch_size: int = ALIGN_POLICY.patch_size, merge_size: int = 2,
                 image_mean: tuple[float, ...] = _NORM.mean,
                 image_std: tuple[float, ...] = _NORM.std, **kwargs):
        super().__init__(**kwargs)
        self.min_pixels, self.max_pixels = int(min_pixels), int(max_pixels)
        self.max_aspect_ratio = float(max_aspect_ratio)
        self.patch_size, self.merge_size = int(patch_size), int(merge_size)
        self.image_mean, self.image_std = tuple(image_mean), tuple(image_std)
        self.policy()  # an inconsistent policy fails here, not at the first image

    @classmethod
    def from_policy(cls, policy: ResizePolicy = ALIGN_POLICY, norm: Normalization = _NORM,
                    merge_size: int = 2) -> "FineViTImageProcessor":
        """The image processor of a training ``ResizePolicy`` and ``Normalization``."""
        if policy.factor != policy.patch_size * merge_size:
            raise ValueError(f"policy factor {policy.factor} is not patch_size {policy.patch_size}"
                             f" x merge_size {merge_size}")
        return cls(min_pixels=policy.min_pixels, max_pixels=policy.max_pixels,
                   max_aspect_ratio=policy.max_aspect_ratio, patch_size=policy.patch_size,
                   merge_size=merge_size, image_mean=norm.mean, image_std=norm.std)

    def policy(self, **overrides) -> ResizePolicy:
        """This processor's ``ResizePolicy`` (``overrides``: per-call ``FineViTImagesKwargs``)."""
        fields = dict(min_pixels=self.min_pixels, max_pixels=self.max_pixels,
                      max_aspect_ratio=self.max_aspect_ratio)
        fields.update({k: v for k, v in overrides.items() if v is not None})
        policy = ResizePolicy(factor=self.patch_size * self.merge_size,
                              patch_size=self.patch_size, **fields)
        policy.target_size(policy.factor, policy.factor)  # validates the bounds (ValueError)
        return policy

    def preprocess(self, images, return_tensors=None, min_pixels: int | None = None,
                   max_pixels: int | None = None, max_aspect_ratio: float | None = None,
                   **unused) -> BatchFeature:
        """``images``: a PIL image or a uint8 ``[H, W, C]`` / ``[C, H, W]`` array, or a (nested)
        list of them. Raises ``BadSampleError`` (a ValueError) for images the training pipeline
        rejects (a side under 2 pixels, aspect ratio above ``max_aspect_ratio``)."""
        if unused := {k: v for k, v in unused.items() if v is not None}:
            raise TypeError(f"FineViTImageProcessor does not take {sorted(unused)}: it resizes and "
                            "normalises exactly as training did (set min_pixels / max_pixels / "
                            "max_aspect_ratio to change the resize policy)")
        policy = self.policy(min_pixels=min_pixels, max_pixels=max_pixels,
                             max_aspect_ratio=max_aspect_ratio)
        norm = Normalization(mean=self.image_mean, std=self.image_std)
        tensors = []
        for image in make_flat_list_of_images(self.fetch_images(images)):
            rgb = load_rgb(image if isinstance(image, Image.Image) else to_pil_image(image))
            tensors.append(resize_and_normalize(rgb, policy.target_size(rgb.height, rgb.width),
                                                norm))
        # imported here: its module loads megatron-core, which `import megatron_finevit.hf` avoids
        from megatron_finevit.models.vit.patch_embed import pack_images

        packed = pack_images(tensors, self.patch_size, self.merge_size)
        grid_thw = torch.cat([torch.ones_like(packed.grids[:, :1]), packed.grids], dim=1)
        return BatchFeature({"pixel_values": packed.patches, "image_grid_thw": grid_thw},
                            tensor_type=return_tensors)

