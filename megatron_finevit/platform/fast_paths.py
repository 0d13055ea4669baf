"""Which of megatron-core's optional fast paths this process can use, for the run log.

megatron-core falls back silently (a warning at import) to torch implementations when
TransformerEngine or Apex is missing: fused Adam, fused RMS/LayerNorm, the ``te`` layer spec, FP8,
TP communication overlap and gradient-accumulation fusion need them. NGC PyTorch containers ship
both; Apex is not on PyPI (build it from NVIDIA/apex), TransformerEngine is
``pip install transformer-engine[pytorch]`` (``.[gpu]``). DALI (``nvidia-dali-cuda120``) decodes
images on the GPU. The trainer logs this report once at start-up.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util


def _version(distribution: str, module: str) -> str:
    """The installed version of ``distribution`` if ``module`` imports from it, else 'absent'."""
    if importlib.util.find_spec(module) is None:
        return "absent"
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "present"


def fast_path_report() -> dict[str, str]:
    """``{name: version | 'present' | 'absent'}`` for TransformerEngine, Apex, DALI, and whether
    CUDA is usable (the fused kernels need it)."""
    import torch

    return {"transformer_engine": _version("transformer-engine", "transformer_engine"),
            "apex": _version("apex", "apex"),
            "dali": _version("nvidia-dali-cuda120", "nvidia.dali"),
            "cuda": torch.version.cuda if torch.cuda.is_available() else "absent"}


def fast_path_line() -> str:
    """One log line: what is found, and what that leaves on the fallback path."""
    found = fast_path_report()
    line = "fast paths: " + ", ".join(f"{k} {v}" for k, v in found.items())
    if found["transformer_engine"] == "absent" or found["cuda"] == "absent":
        line += " (te spec, FP8, TP comm overlap and grad-accumulation fusion unavailable)"
    if found["apex"] == "absent" and found["transformer_engine"] == "absent":
        line += " (torch Adam and norms instead of fused ones)"
    return line
