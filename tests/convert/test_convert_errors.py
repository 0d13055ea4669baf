"""Bad HF input fails before any compute, with an error naming the tensor, and writes nothing."""

import json

import pytest
import torch
from safetensors.torch import save_file

from megatron_finevit.config.llm import tiny_qwen3
from megatron_finevit.convert.pipeline import hf_to_megatron
from megatron_finevit.convert.registry import ConversionError, expand, get_converter

CONFIG = tiny_qwen3(vocab_size=300, tie_embeddings=False)


def write_hf_dir(path, config=CONFIG, drop=(), extra=(), config_changes=None):
    """An HF checkpoint directory with the tensors the Qwen3 mapping expects (minus ``drop``,
    plus ``extra``) and a config.json (with ``config_changes``)."""
    converter = get_converter("qwen3")
    tensors = {}
    for mapping, layer in expand(converter.mappings(config), config.num_layers):
        for name, shape in zip(mapping.hf_names(layer), mapping.hf_shapes):
            tensors[name] = torch.zeros(shape)
    for name in drop:
        del tensors[name]
    for name in extra:
        tensors[name] = torch.zeros(2)
    path.mkdir()
    save_file(tensors, str(path / "model.safetensors"))
    hf_config = converter.hf_config(config, torch.float32)
    hf_config.update(config_changes or {})
    (path / "config.json").write_text(json.dumps(hf_config))
    return path


def _convert(tmp_path, hf_dir, **kwargs):
    out = tmp_path / "mcore"
    try:
        hf_to_megatron("qwen3", str(hf_dir), str(out), progress=False, **kwargs)
    finally:
        assert not out.exists()  # nothing half-written


def test_missing_tensor_is_named(tmp_path):
    hf = write_hf_dir(tmp_path / "hf", drop=["model.layers.2.mlp.up_proj.weight"])
    with pytest.raises(ConversionError, match=r"missing tensors \(1\): model.layers.2.mlp.up_proj.weight"):
        _convert(tmp_path, hf)


def test_unexpected_tensor_is_named(tmp_path):
    hf = write_hf_dir(tmp_path / "hf", extra=["model.layers.0.mlp.extra.weight"])
    with pytest.raises(ConversionError, match=r"unexpected tensors \(1\): model.layers.0.mlp.extra.weight"):
        _convert(tmp_path, hf)


def test_config_weight_mismatch_names_tensors(tmp_path):
    hf = write_hf_dir(tmp_path / "hf", config_changes={"intermediate_size": 128})
    with pytest.raises(ConversionError, match=r"model.layers.0.mlp.down_proj.weight has shape "
                                              r"\(64, 96\), the config implies \(64, 128\)"):
        _convert(tmp_path, hf)


def test_tp_not_dividing_heads(tmp_path):
    hf = write_hf_dir(tmp_path / "hf")
    with pytest.raises(ConversionError, match="tensor_parallel=3 does not divide num_attention_heads=4"):
        _convert(tmp_path, hf, tensor_parallel=3)


def test_unsupported_config_feature(tmp_path):
    hf = write_hf_dir(tmp_path / "hf", config_changes={"attention_bias": True})
    with pytest.raises(ConversionError, match="attention_bias=true"):
        _convert(tmp_path, hf)


def test_wrong_model_type(tmp_path):
    hf = write_hf_dir(tmp_path / "hf", config_changes={"model_type": "llama"})
    with pytest.raises(ConversionError, match="model_type='llama'"):
        _convert(tmp_path, hf)


def test_tied_checkpoint_may_carry_lm_head(tmp_path):
    """A tied model's redundant ``lm_head`` is ignored (it is the embedding): the only error is
    the deliberately missing norm."""
    tied = tiny_qwen3(vocab_size=300)
    hf = write_hf_dir(tmp_path / "hf", config=tied, extra=["lm_head.weight"],
                      drop=["model.norm.weight"])
    with pytest.raises(ConversionError) as info:
        _convert(tmp_path, hf)
    assert "model.norm.weight" in str(info.value) and "lm_head" not in str(info.value)
