"""Device and collective backend: CUDA + NCCL when a GPU is present, else CPU + gloo."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Backend:
    device_type: str  # "cuda" or "cpu"
    dist_backend: str  # "nccl" or "gloo"

    def device(self, local_rank: int = 0) -> torch.device:
        if self.device_type == "cuda":
            return torch.device("cuda", local_rank)
        return torch.device("cpu")


def detect_backend(prefer: str | None = None) -> Backend:
    """Pick the backend. ``prefer`` ("cpu" or "cuda") overrides detection; asking for CUDA on a
    machine without it is an error rather than a silent fallback."""
    if prefer not in (None, "cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {prefer!r}")
    cuda = torch.cuda.is_available()
    if prefer == "cuda" and not cuda:
        raise RuntimeError("device='cuda' was requested but torch sees no CUDA device")
    if prefer == "cpu" or not cuda:
        return Backend("cpu", "gloo")
    return Backend("cuda", "nccl")
