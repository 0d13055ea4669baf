"""What every model config shares: the megatron ``TransformerConfig`` plumbing (parallel sizes,
dtype flags, CUDA-only fusions off) and the dict round trip used by checkpoints and converters."""

from __future__ import annotations

from dataclasses import asdict, fields

import torch

SPEC_BACKENDS = ("local", "te")
FP8_FORMATS = (None, "hybrid", "e4m3")
FP8_RECIPES = ("delayed", "tensorwise", "mxfp8", "blockwise")
RECOMPUTE_GRANULARITIES = (None, "full", "selective")
RECOMPUTE_METHODS = ("uniform", "block")
# the model-config fields that pass straight to megatron's TransformerConfig: they choose what the
# backward pass recomputes, never the weights (a checkpoint loads whatever they are)
RECOMPUTE_FIELDS = ("recompute_granularity", "recompute_method", "recompute_num_layers")


def transformer_config(*, tensor_parallel: int = 1, pipeline_parallel: int = 1,
                       context_parallel: int = 1, sequence_parallel: bool = False,
                       params_dtype: torch.dtype = torch.float32, overrides: dict | None = None,
                       **model):
    """megatron ``TransformerConfig`` from a model's own fields (``model``: num_layers,
    hidden_size, normalization, activation ...) at one parallel layout.

    ``params_dtype`` bf16/fp16 switches megatron's mixed-precision mode on. The fused kernels
    megatron would otherwise pick need CUDA (the te spec brings its own fused paths) and our 2D
    RoPE table must go through the unfused THD path, so all fusions are off. Weights are
    initialised on the CPU when there is no GPU. ``overrides`` set any other field last.
    """
    from megatron.core.transformer.transformer_config import TransformerConfig

    kwargs = dict(
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=tensor_parallel,
        pipeline_model_parallel_size=pipeline_parallel,
        context_parallel_size=context_parallel,
        sequence_parallel=sequence_parallel,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        apply_rope_fusion=False,
        bias_dropout_fusion=False,
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        use_cpu_initialization=not torch.cuda.is_available(),
    )
    kwargs.update(model)
    kwargs.update(overrides or {})
    return TransformerConfig(**kwargs)


class DictConfig:
    """``to_dict`` / ``from_dict`` for a dataclass config; unknown fields are an error."""

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict):
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} fields {unknown}; known: {sorted(known)}")
        return cls(**values)


def nonpositive_fields(config, types: tuple[str, ...] = ("int",)) -> list[str]:
    """Problems for every numeric field (annotated as one of ``types``) that is not positive."""
    return [f"{f.name}={getattr(config, f.name)} must be positive" for f in fields(config)
            if f.type in types and isinstance(getattr(config, f.name), (int, float))
            and getattr(config, f.name) <= 0]


def indivisible_by(config, divisor: int, names: tuple[str, ...],
                   divisor_name: str = "tensor_parallel") -> list[str]:
    """Problems for every attribute in ``names`` that ``divisor`` does not divide."""
    return [f"{divisor_name}={divisor} does not divide {name}={getattr(config, name)}"
            for name in names if getattr(config, name) % divisor]


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def spec_backend_problems(config) -> list[str]:
    """Problems with a model config's layer-spec choice: ``spec_backend`` (``local`` or ``te``),
    ``fp8`` (None, ``hybrid``, ``e4m3``; only with ``te``: the local spec's torch linears have no
    FP8 path) and ``fp8_recipe`` (megatron's ``Fp8Recipe`` names)."""
    problems = []
    if config.spec_backend not in SPEC_BACKENDS:
        problems.append(f"spec_backend={config.spec_backend!r} must be one of {SPEC_BACKENDS}")
    if config.fp8 not in FP8_FORMATS:
        problems.append(f"fp8={config.fp8!r} must be one of {FP8_FORMATS}")
    elif config.fp8 is not None and config.spec_backend != "te":
        problems.append(f"fp8={config.fp8!r} needs spec_backend='te' (TransformerEngine); "
                        f"got spec_backend={config.spec_backend!r}")
    if config.fp8_recipe not in FP8_RECIPES:
        problems.append(f"fp8_recipe={config.fp8_recipe!r} must be one of {FP8_RECIPES}")
    return problems


def recompute_problems(config) -> list[str]:
    """Problems with a model config's activation recompute (megatron-core's, checked here so they
    are listed with the rest of the config): ``recompute_granularity`` None (off), ``full`` (whole
    layers; ``recompute_method`` ``uniform``: chunks of ``recompute_num_layers`` layers keep only
    their input, ``block``: the first ``recompute_num_layers`` layers of each pipeline stage do) or
    ``selective`` (core attention only, megatron's default module; no method or layer count)."""
    granularity, method, layers = (getattr(config, name) for name in RECOMPUTE_FIELDS)
    if granularity not in RECOMPUTE_GRANULARITIES:
        return [f"recompute_granularity={granularity!r} must be one of {RECOMPUTE_GRANULARITIES}"]
    if granularity == "full":
        problems = []
        if method not in RECOMPUTE_METHODS:
            problems.append(f"recompute_granularity='full' needs recompute_method in "
                            f"{RECOMPUTE_METHODS}; got {method!r}")
        if not isinstance(layers, int) or layers < 1:
            problems.append(f"recompute_granularity='full' needs recompute_num_layers >= 1; "
                            f"got {layers!r}")
        return problems
    if method is not None or layers is not None:
        return [f"recompute_method / recompute_num_layers ({method!r}, {layers!r}) need "
                f"recompute_granularity='full' (got {granularity!r})"]
    return []


def require_spec_backend(config) -> None:
    """After validation: a ``te`` config on a machine without TransformerEngine raises
    ``BackendUnavailable`` (with the fix) before any tensor exists."""
    if config.spec_backend == "te":
        from megatron_finevit.models.specs import require_transformer_engine

        require_transformer_engine()
