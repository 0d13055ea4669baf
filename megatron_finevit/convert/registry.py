"""Parameter mappings between Hugging Face and megatron checkpoints (the Megatron-Bridge pattern).

A model converter lists one ``ParamMapping`` per megatron tensor. A mapping names

* ``megatron``: the megatron *checkpoint key* (the ``dist_checkpointing`` key, which is the same
  for the ``local`` and ``te`` specs — megatron maps local norm names onto TE's fused
  ``linear_qkv.layer_norm_weight`` etc.), with ``*`` standing for the layer index;
* ``hf``: the Hugging Face on-disk tensor name(s) it is built from, ``*`` likewise;
* the HF shapes it expects, so a checkpoint can be validated before any compute;
* how to go from the HF tensors to the full (TP = 1) megatron tensor and back, and how that full
  tensor splits across tensor-parallel ranks (``shard``) and merges again (``unshard``).

Mapping kinds:

| class              | megatron tensor                              | TP rule                          |
|--------------------|----------------------------------------------|----------------------------------|
| ``AutoMapping``    | the HF tensor as is                          | column (dim 0), row (dim 1) or replicated |
| ``VocabMapping``   | embedding / output table, zero rows padded   | rows (dim 0) over the padded size |
| ``QKVMapping``     | fused QKV, grouped [q_g0, k_g0, v_g0, q_g1…]  | dim 0: whole query groups per rank |
| ``GatedMLPMapping``| fc1 = [gate; up]                             | gate and up split separately: rank r holds [gate_r; up_r] |

Model converters (``convert/qwen3.py`` …) register under a name in ``CONVERTERS``; each is one
module exposing ``CONVERTER``.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Protocol, Sequence

import torch

# name -> module that defines ``CONVERTER``. A new model is one module plus one line here.
CONVERTERS = {
    "qwen3": "megatron_finevit.convert.qwen3",
    "siglip2-text": "megatron_finevit.convert.siglip2_text",
    "finevit": "megatron_finevit.convert.finevit",
    "finevit-vl": "megatron_finevit.convert.finevit_vl",
}

Shape = tuple[int, ...]


class ConversionError(ValueError):
    """A checkpoint does not match the mapping or the config; the message names the tensor."""


@dataclass(frozen=True)
class ParamMapping:
    """Base: one megatron tensor <-> one or more HF tensors. Subclasses define the layout."""

    megatron: str
    hf: tuple[str, ...]
    hf_shapes: tuple[Shape, ...]
    tp_dim: int | None = None  # the dimension TP splits, None = replicated
    # Depth of this mapping's layer stack; None = the model config's ``num_layers``. Set by
    # composite converters (FineViT-VL has two stacks of different depth).
    num_layers: int | None = None

    def layers(self, default: int) -> int:
        return default if self.num_layers is None else self.num_layers

    @property
    def per_layer(self) -> bool:
        return "*" in self.megatron

    def megatron_key(self) -> str:
        """The dist_checkpointing key: layer tensors are stacked along a leading layer axis, so the
        key has no layer index."""
        return self.megatron.replace(".*", "")

    def hf_names(self, layer: int | None) -> tuple[str, ...]:
        return tuple(n.replace("*", str(layer)) for n in self.hf) if self.per_layer else self.hf

    def megatron_shape(self) -> Shape:
        """The full megatron tensor's shape, derived by running ``to_megatron`` on meta tensors."""
        meta = [torch.empty(s, device="meta") for s in self.hf_shapes]
        return tuple(self.to_megatron(meta).shape)

    # Layout (1:1 here); subclasses override.
    def to_megatron(self, hf: Sequence[torch.Tensor]) -> torch.Tensor:
        (tensor,) = hf
        return tensor

    def to_hf(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        return [tensor]

    def shard(self, full: torch.Tensor, tp: int, rank: int) -> torch.Tensor:
        """This TP rank's slice of the full megatron tensor."""
        if self.tp_dim is None or tp == 1:
            return full
        return full.chunk(tp, dim=self.tp_dim)[rank]

    def unshard(self, shards: Sequence[torch.Tensor]) -> torch.Tensor:
        if self.tp_dim is None or len(shards) == 1:
            return shards[0]
        return torch.cat(list(shards), dim=self.tp_dim)


@dataclass(frozen=True)
class AutoMapping(ParamMapping):
    """1:1 copy. ``tp_dim`` 0 = column-parallel, 1 = row-parallel, None = replicated."""

    tp_dim: int | None = None


def replicated(megatron: str, hf: str, shape: Shape) -> AutoMapping:
    return AutoMapping(megatron, (hf,), (shape,), tp_dim=None)


def column_parallel(megatron: str, hf: str, shape: Shape) -> AutoMapping:
    return AutoMapping(megatron, (hf,), (shape,), tp_dim=0)


def row_parallel(megatron: str, hf: str, shape: Shape) -> AutoMapping:
    return AutoMapping(megatron, (hf,), (shape,), tp_dim=1)


@dataclass(frozen=True)
class VocabMapping(ParamMapping):
    """Embedding or output table: megatron holds ``padded_rows`` rows (zeros after the real ones),
    split by rows across TP ranks; HF holds the real rows only."""

    padded_rows: int = 0
    tp_dim: int | None = 0

    def to_megatron(self, hf):
        (table,) = hf
        extra = self.padded_rows - table.shape[0]
        if extra < 0:
            raise ConversionError(f"{self.hf[0]}: {table.shape[0]} rows exceed the padded "
                                  f"vocabulary of {self.padded_rows}")
        return torch.nn.functional.pad(table, (0, 0, 0, extra)) if extra else table

    def to_hf(self, tensor):
        return [tensor[: self.hf_shapes[0][0]]]


@dataclass(frozen=True)
class QKVMapping(ParamMapping):
    """q, k, v projections (HF: ``[heads·d, h]``, ``[groups·d, h]`` ×2) <-> megatron's fused
    ``linear_qkv`` ``[(heads + 2·groups)·d, h]``, laid out group by group: the ``heads/groups``
    query heads of group g, then g's key head, then g's value head. Splitting rows in TP equal
    chunks therefore gives each rank whole query groups. Works for weights and biases."""

    num_heads: int = 0
    num_groups: int = 0
    head_dim: int = 0
    tp_dim: int | None = 0

    def to_megatron(self, hf):
        q, k, v = hf
        rest = q.shape[1:]
        per_group = self.num_heads // self.num_groups
        q = q.reshape(self.num_groups, per_group * self.head_dim, *rest)
        k = k.reshape(self.num_groups, self.head_dim, *rest)
        v = v.reshape(self.num_groups, self.head_dim, *rest)
        return torch.cat([q, k, v], dim=1).reshape(-1, *rest)

    def to_hf(self, tensor):
        rest = tensor.shape[1:]
        per_group = self.num_heads // self.num_groups
        grouped = tensor.reshape(self.num_groups, (per_group + 2) * self.head_dim, *rest)
        q, k, v = grouped.split([per_group * self.head_dim, self.head_dim, self.head_dim], dim=1)
        return [t.reshape(-1, *rest) for t in (q, k, v)]


@dataclass(frozen=True)
class GatedMLPMapping(ParamMapping):
    """gate ``[f, h]`` and up ``[f, h]`` <-> megatron's ``linear_fc1`` ``[2f, h]`` = [gate; up].
    Under TP each rank holds [gate_r; up_r] (its slice of each), not a slice of the concatenation."""

    tp_dim: int | None = 0

    def to_megatron(self, hf):
        gate, up = hf
        return torch.cat([gate, up], dim=0)

    def to_hf(self, tensor):
        return list(tensor.chunk(2, dim=0))

    def shard(self, full, tp, rank):
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(tp, dim=0)[rank], up.chunk(tp, dim=0)[rank]], dim=0)

    def unshard(self, shards):
        gates, ups = zip(*(s.chunk(2, dim=0) for s in shards))
        return torch.cat([*gates, *ups], dim=0)


class ModelConverter(Protocol):
    """What a model module exposes as ``CONVERTER``."""

    name: str
    config_class: type
    megatron_roots: tuple[str, ...]  # top-level megatron modules (checkpoint key prefixes)

    def config_from_hf(self, hf_config: dict): ...

    def hf_config(self, config, dtype: torch.dtype) -> dict: ...

    def mappings(self, config) -> list[ParamMapping]: ...

    def ignored_hf_keys(self, config) -> set[str]: ...

    def build_model(self, config, transformer_config): ...

    def transformer_config(self, config, params_dtype: torch.dtype, **overrides): ...


def get_converter(name: str) -> ModelConverter:
    if name not in CONVERTERS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(CONVERTERS)}")
    module_name = CONVERTERS[name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name != module_name:
            raise
        raise NotImplementedError(
            f"conversion for {name!r} is not available in this version (no {module_name})") from exc
    return module.CONVERTER


def expand(mappings: Sequence[ParamMapping], num_layers: int):
    """Yield (mapping, layer) for every tensor: per-layer mappings once per layer of their stack
    (``mapping.num_layers``, else ``num_layers``; layer-major, so a converter streams one layer
    at a time), the others once with layer None."""
    for m in mappings:
        if not m.per_layer:
            yield m, None
    depth = max((m.layers(num_layers) for m in mappings if m.per_layer), default=0)
    for layer in range(depth):
        for m in mappings:
            if m.per_layer and layer < m.layers(num_layers):
                yield m, layer
