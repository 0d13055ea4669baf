"""The two conversions, HF -> megatron and megatron -> HF, driven by a model's mapping list.

Both validate everything they can *before* compute — config translation, TP/PP divisibility,
every tensor's presence and shape — and raise ``ConversionError`` naming the tensors; both write
into a staging directory that is published by one rename at the end (``io.staged_output``).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
from tqdm import tqdm

from megatron_finevit.convert.io import (
    SafetensorsReader,
    ShardedSafetensorsWriter,
    check_output_dir,
    copy_tokenizer_files,
    staged_output,
)
from megatron_finevit.convert.registry import ConversionError, ParamMapping, expand, get_converter

log = logging.getLogger(__name__)

MODEL_CONFIG_FILE = "model_config.json"  # written beside the megatron checkpoint
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    if name not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {name!r}")
    return _DTYPES[name]


def _problems(kind: str, names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit]) + (f" (+{len(names) - limit} more)" if len(names) > limit else "")
    return f"{kind} ({len(names)}): {shown}"


def check_hf_tensors(reader: SafetensorsReader, plan, ignored: set[str]) -> None:
    """Every tensor the mappings need is present with the config's shape, and nothing else is."""
    expected: dict[str, tuple[int, ...]] = {}
    for mapping, layer in plan:
        expected.update(zip(mapping.hf_names(layer), mapping.hf_shapes))
    present = set(reader.keys())
    errors = []
    missing = sorted(set(expected) - present)
    if missing:
        errors.append(_problems("missing tensors", missing))
    unexpected = sorted(present - set(expected) - ignored)
    if unexpected:
        errors.append(_problems("unexpected tensors", unexpected))
    wrong = [f"{n} has shape {reader.shape(n)}, the config implies {s}"
             for n, s in expected.items() if n in present and reader.shape(n) != tuple(s)]
    if wrong:
        errors.append(_problems("shape mismatches", wrong))
    if errors:
        raise ConversionError(f"HF checkpoint {reader.dir} does not match its config.json: "
                              + "; ".join(errors))


def _expected_megatron_shape(mapping: ParamMapping, num_layers: int) -> tuple[int, ...]:
    shape = mapping.megatron_shape()
    return (mapping.layers(num_layers), *shape) if mapping.per_layer else shape


def check_megatron_tensors(reader, mappings: list[ParamMapping], num_layers: int,
                           roots: tuple[str, ...]) -> None:
    """The checkpoint's model tensors — keys under the model's top-level modules ``roots`` — are
    exactly the mappings' tensors, with their shapes. Other keys (optimizer state …) are ignored;
    a vocabulary table may carry more padding rows than ours (another padding rule): they are
    dropped."""
    expected = {m.megatron_key(): m for m in mappings}
    present = {k for k in reader.keys() if k.split(".")[0] in roots}
    errors = []
    missing = sorted(set(expected) - present)
    if missing:
        errors.append(_problems("missing tensors", missing))
    unexpected = sorted(present - set(expected))
    if unexpected:
        errors.append(_problems("unexpected tensors", unexpected))
    wrong = []
    for key in sorted(set(expected) & present):
        want, got = _expected_megatron_shape(expected[key], num_layers), reader.shape(key)
        vocab_padding_differs = (hasattr(expected[key], "padded_rows") and len(got) == len(want)
                                 and got[1:] == want[1:] and got[0] >= expected[key].hf_shapes[0][0])
        if got != want and not vocab_padding_differs:
            wrong.append(f"{key} has shape {got}, the config implies {want}")
    if wrong:
        errors.append(_problems("shape mismatches", wrong))
    if errors:
        raise ConversionError(f"megatron checkpoint {reader.dir} does not match the model config: "
                              + "; ".join(errors))


def _single_dtype(reader: SafetensorsReader) -> torch.dtype:
    dtypes = reader.dtypes()
    if len(dtypes) != 1:
        raise ConversionError(f"HF tensors have mixed dtypes {sorted(map(str, dtypes))}; "
                              "pass --dtype to choose the megatron dtype")
    (dtype,) = dtypes
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ConversionError(f"unsupported HF tensor dtype {dtype}")
    return dtype


def hf_to_megatron(model: str, hf_dir: str, mcore_dir: str, tensor_parallel: int = 1,
                   pipeline_parallel: int = 1, dtype: torch.dtype | None = None,
                   overwrite: bool = False, progress: bool = True) -> dict:
    """Convert an HF checkpoint directory into a megatron torch_dist checkpoint.

    ``tensor_parallel`` / ``pipeline_parallel`` are the layout the checkpoint is meant for: the
    model must split at it (heads, vocabulary, layers), else this fails before converting. The
    checkpoint itself is layout-independent (see mcore_io) and loads at any TP / PP.
    Returns a summary (tensors, bytes, seconds).
    """
    from megatron_finevit.convert.mcore_io import (
        checkpoint_tensors,
        save_model_checkpoint,
        single_rank_world,
    )

    start = time.perf_counter()
    converter = get_converter(model)
    hf_path = Path(hf_dir)
    config_path = hf_path / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found")
    config = converter.config_from_hf(json.loads(config_path.read_text()))
    try:
        config.validate(tensor_parallel, pipeline_parallel)
    except ValueError as exc:
        raise ConversionError(str(exc)) from exc
    reader = SafetensorsReader(hf_path)
    mappings = converter.mappings(config)
    plan = list(expand(mappings, config.num_layers))
    check_hf_tensors(reader, plan, converter.ignored_hf_keys(config))
    dtype = dtype or _single_dtype(reader)
    check_output_dir(mcore_dir, overwrite)

    num_bytes = 0
    with single_rank_world():
        tc = converter.transformer_config(config, dtype, perform_initialization=False)
        megatron_model = converter.build_model(config, tc)
        targets = checkpoint_tensors(megatron_model)
        planned = {(m.megatron_key(), layer) for m, layer in plan}
        if planned != set(targets):
            raise ConversionError(
                f"the {model} mapping and the megatron model disagree: model-only "
                f"{sorted(set(targets) - planned)[:5]}, mapping-only {sorted(planned - set(targets))[:5]}")
        with torch.no_grad():
            for mapping, layer in tqdm(plan, desc=f"{model} HF -> megatron", unit="tensor",
                                       disable=not progress):
                hf_tensors = [reader.get(n).to(dtype) for n in mapping.hf_names(layer)]
                target = targets[(mapping.megatron_key(), layer)]
                target.copy_(mapping.to_megatron(hf_tensors))
                num_bytes += target.numel() * target.element_size()
        with staged_output(mcore_dir, overwrite) as staging:
            save_model_checkpoint(megatron_model, staging)
            (staging / MODEL_CONFIG_FILE).write_text(json.dumps({
                "model": model,
                "config": config.to_dict(),
                "dtype": str(dtype).removeprefix("torch."),
                "layout_checked": {"tensor_parallel": tensor_parallel,
                                   "pipeline_parallel": pipeline_parallel},
            }, indent=2) + "\n")
    summary = {"tensors": len(plan), "bytes": num_bytes, "seconds": time.perf_counter() - start}
    log.info("HF -> megatron: %d tensors, %.2f GB in %.1f s -> %s", summary["tensors"],
             num_bytes / 1e9, summary["seconds"], mcore_dir)
    return summary


def load_model_config(model: str, mcore_dir: str, config=None):
    """The model config: given, or from the ``model_config.json`` that hf-to-mcore writes."""
    converter = get_converter(model)
    if config is not None:
        return config
    path = Path(mcore_dir) / MODEL_CONFIG_FILE
    if not path.is_file():
        raise ConversionError(f"{path} not found: pass the model config (--preset or --config) "
                              "for checkpoints not written by hf-to-mcore")
    saved = json.loads(path.read_text())
    if saved.get("model") != model:
        raise ConversionError(f"{path} describes model {saved.get('model')!r}, not {model!r}")
    return converter.config_class.from_dict(saved["config"])


def megatron_to_hf(model: str, mcore_dir: str, hf_dir: str, config=None,
                   dtype: torch.dtype | None = None, tokenizer_dir: str | None = None,
                   max_shard_bytes: int = 4 * 2**30, overwrite: bool = False,
                   progress: bool = True, megatron_prefix: str = "") -> dict:
    """Export a megatron torch_dist checkpoint (saved at any TP / PP) as an HF directory:
    safetensors shards (+ index), ``config.json`` and, if ``tokenizer_dir`` is given, its
    tokenizer files, else the model's default processor files if it has any (FineViT-VL: the
    bundled Qwen tokenizer and the training image processor). Reads one layer at a time.
    ``megatron_prefix`` selects a model stored inside a larger one (``"encoder."``: the FineViT
    of a Stage I/II trainer checkpoint). Returns a summary."""
    from megatron_finevit.convert.mcore_io import MegatronCheckpointReader

    start = time.perf_counter()
    converter = get_converter(model)
    config = load_model_config(model, mcore_dir, config)
    try:
        config.validate()
    except ValueError as exc:
        raise ConversionError(str(exc)) from exc
    mappings = converter.mappings(config)
    check_output_dir(hf_dir, overwrite)
    reader = MegatronCheckpointReader(mcore_dir, prefix=megatron_prefix)
    check_megatron_tensors(reader, mappings, config.num_layers, converter.megatron_roots)
    dtype = dtype or reader.dtype(mappings[0].megatron_key())
    groups: dict[int | None, list[ParamMapping]] = {}
    for mapping, layer in expand(mappings, config.num_layers):
        groups.setdefault(layer, []).append(mapping)
    with staged_output(hf_dir, overwrite) as staging:
        writer = ShardedSafetensorsWriter(staging, max_shard_bytes)
        for layer, group in tqdm(groups.items(), desc=f"{model} megatron -> HF", unit="layer",
                                 disable=not progress):
            loaded = reader.load([(m.megatron_key(), layer) for m in group])
            for mapping in group:
                tensors = mapping.to_hf(loaded[(mapping.megatron_key(), layer)])
                for name, tensor in zip(mapping.hf_names(layer), tensors):
                    writer.add(name, tensor.to(dtype))
            del loaded
        files = writer.close()
        (staging / "config.json").write_text(
            json.dumps(converter.hf_config(config, dtype), indent=2) + "\n")
        if tokenizer_dir:
            tokenizer_files = copy_tokenizer_files(tokenizer_dir, staging)
        elif hasattr(converter, "save_processor"):  # a model with a default processor
            tokenizer_files = converter.save_processor(config, staging)
        else:
            tokenizer_files = []
    summary = {"files": files, "tokenizer_files": tokenizer_files, "bytes": writer.total_bytes,
               "seconds": time.perf_counter() - start}
    log.info("megatron -> HF: %.2f GB in %d file(s), %.1f s -> %s", writer.total_bytes / 1e9,
             len(files), summary["seconds"], hf_dir)
    return summary
