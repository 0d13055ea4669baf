"""Qwen3 HF <-> megatron conversion against transformers' ``Qwen3ForCausalLM`` (the external
oracle), on tiny random models and real-tokenizer text:

- HF -> megatron, loaded at TP1, TP2 and PP2: logits equal transformers' (fp32, <= 1e-4);
- megatron (random init at TP2 / PP2, saved as a trainer saves) -> HF: transformers' logits on the
  export equal megatron's;
- HF -> megatron -> HF is bit-exact; the command-line tool works and fails cleanly.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_finevit.config.llm import tiny_qwen3
from megatron_finevit.convert.io import SafetensorsReader
from megatron_finevit.convert.pipeline import megatron_to_hf
from megatron_finevit.testing.multirank import run_world
from megatron_finevit.testing.qwen3_parity import (
    Layout,
    convert_world,
    hf_packed_logits,
    load_and_export_world,
    text_segments,
)

ORACLE_TOL = 1e-4
REPO = Path(__file__).resolve().parents[2]


def make_hf_model(path: Path, tied: bool, seed: int, max_shard_size: str = "200MB"):
    """A random tiny Qwen3 in transformers, saved with ``save_pretrained``."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    c = tiny_qwen3(tie_embeddings=tied)
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(Qwen3Config(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.ffn_hidden_size,
        num_hidden_layers=c.num_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_query_groups, head_dim=c.head_dim, rope_theta=c.rope_theta,
        rms_norm_eps=c.norm_eps, max_position_embeddings=c.max_position_embeddings,
        tie_word_embeddings=tied, bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id,
    )).eval()
    with torch.no_grad():  # transformers initialises norms to 1: make them informative
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(path, max_shard_size=max_shard_size)
    return model


def hf_logits(path: Path) -> torch.Tensor:
    from transformers import Qwen3ForCausalLM

    model = Qwen3ForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return hf_packed_logits(model, text_segments())


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen3_convert")
    tied = make_hf_model(root / "hf_tied", tied=True, seed=1)
    # Untied and split into several safetensors files + index, as the public 8B is.
    untied = make_hf_model(root / "hf_untied", tied=False, seed=2, max_shard_size="30MB")
    segments = text_segments()
    oracle = {"tied": hf_packed_logits(tied, segments), "untied": hf_packed_logits(untied, segments)}
    jobs = [dict(hf_dir=str(root / "hf_tied"), mcore_dir=str(root / "mc_tied"), tp=2, pp=2),
            dict(hf_dir=str(root / "hf_untied"), mcore_dir=str(root / "mc_untied"), tp=2, pp=1)]
    (converted,) = run_world(convert_world, 1, args=(jobs,))
    export_configs = {"tp2_untied": tiny_qwen3(tie_embeddings=False), "pp2_tied": tiny_qwen3()}
    export_layouts = {"tp2_untied": Layout(tp=2), "pp2_tied": Layout(pp=2)}
    export_dirs = {name: str(root / f"trained_{name}") for name in export_configs}
    ranks = run_world(load_and_export_world, 2, args=(
        tiny_qwen3(), str(root / "mc_tied"), [Layout(tp=2), Layout(pp=2)],
        export_configs, export_layouts, export_dirs))
    return dict(root=root, oracle=oracle, converted=converted, ranks=ranks,
                export_configs=export_configs, export_dirs=export_dirs)


def _max_diff(a, b):
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


@pytest.mark.parametrize("name", ["tied", "untied"])
def test_hf_to_mcore_at_tp1_matches_transformers(work, name):
    result = work["converted"][str(work["root"] / f"mc_{name}")]
    # embedding + final norm (+ output layer if untied) + 8 tensors per layer
    assert result["summary"]["tensors"] == 2 + 8 * 4 + int(name == "untied")
    assert _max_diff(result["logits"], work["oracle"][name]) <= ORACLE_TOL
    assert work["oracle"][name].std() > 0.05  # a real, non-degenerate signal


@pytest.mark.parametrize("label", ["tp2_pp1_cp1", "tp1_pp2_cp1"])
def test_hf_to_mcore_loaded_at_tp2_pp2_matches_transformers(work, label):
    outputs = [r["loaded"][label]["logits"] for r in work["ranks"]
               if r["loaded"][label]["logits"] is not None]
    assert outputs
    for logits in outputs:
        assert _max_diff(logits, work["oracle"]["tied"]) <= ORACLE_TOL


@pytest.mark.parametrize("name", ["tp2_untied", "pp2_tied"])
def test_megatron_export_matches_transformers(work, name, tmp_path):
    megatron = [r["exported"][name] for r in work["ranks"] if r["exported"][name] is not None][0]
    out = tmp_path / "hf"
    summary = megatron_to_hf("qwen3", work["export_dirs"][name], str(out),
                             config=work["export_configs"][name], progress=False)
    assert summary["files"] == ["model.safetensors"]
    assert _max_diff(hf_logits(out), megatron) <= ORACLE_TOL


def test_cli_exports_a_checkpoint_without_model_config_by_preset(work, tmp_path, convert_tool,
                                                                capsys):
    """A trainer's checkpoint carries no model_config.json: --preset supplies the config."""
    megatron = [r["exported"]["pp2_tied"] for r in work["ranks"]
                if r["exported"]["pp2_tied"] is not None][0]
    out = tmp_path / "hf"
    assert convert_tool("mcore-to-hf", "--model", "qwen3", "--preset", "tiny_qwen3",
                        "--mcore-dir", work["export_dirs"]["pp2_tied"], "--hf-dir", str(out),
                        "--no-progress") == 0
    assert _max_diff(hf_logits(out), megatron) <= ORACLE_TOL
    assert convert_tool("mcore-to-hf", "--model", "qwen3", "--preset", "qwen3_9b",
                        "--mcore-dir", work["export_dirs"]["pp2_tied"],
                        "--hf-dir", str(tmp_path / "bad")) == 2
    assert "unknown Qwen3 preset 'qwen3_9b'" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["tied", "untied"])
def test_round_trip_is_bit_exact(work, name, tmp_path):
    source = work["root"] / f"hf_{name}"
    out = tmp_path / "back"
    # A small shard size: the export is split into several files plus an index.
    summary = megatron_to_hf("qwen3", str(work["root"] / f"mc_{name}"), str(out),
                             max_shard_bytes=20 * 2**20, progress=False)
    assert len(summary["files"]) > 1 and (out / "model.safetensors.index.json").exists()
    original, exported = SafetensorsReader(source), SafetensorsReader(out)
    assert exported.keys() == original.keys()
    for key in original.keys():
        assert torch.equal(exported.get(key), original.get(key)), key
    want, got = json.loads((source / "config.json").read_text()), json.loads((out / "config.json").read_text())
    for field in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "head_dim", "vocab_size", "tie_word_embeddings",
                  "rms_norm_eps", "max_position_embeddings", "bos_token_id", "eos_token_id"):
        assert got[field] == want[field], field
    assert got["rope_theta"] == want["rope_parameters"]["rope_theta"]


def _tool(*args):
    return subprocess.run([sys.executable, str(REPO / "tools" / "convert_checkpoint.py"), *args],
                          capture_output=True, text=True, cwd=REPO, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO)})


def test_cli_exports_with_tokenizer_files(work, tmp_path):
    tokenizer_dir = tmp_path / "tok"
    tokenizer_dir.mkdir()
    (tokenizer_dir / "tokenizer_config.json").write_text('{"model_max_length": 40960}')
    (tokenizer_dir / "merges.txt").write_text("#version: 0.2\n")
    out = tmp_path / "hf"
    result = _tool("mcore-to-hf", "--model", "qwen3", "--mcore-dir", str(work["root"] / "mc_tied"),
                   "--hf-dir", str(out), "--tokenizer-dir", str(tokenizer_dir), "--dtype", "bfloat16")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["tokenizer_files"] == ["tokenizer_config.json", "merges.txt"]
    assert (out / "merges.txt").read_text() == "#version: 0.2\n"
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert SafetensorsReader(out).dtypes() == {torch.bfloat16}
    assert "megatron -> HF" in result.stderr  # the progress bar


def test_cli_rejects_tp_that_does_not_divide_heads(work, tmp_path, capsys, convert_tool):
    out = tmp_path / "mc"
    code = convert_tool("hf-to-mcore", "--model", "qwen3", "--hf-dir", str(work["root"] / "hf_tied"),
                      "--mcore-dir", str(out), "--tp", "3")
    assert code == 2
    assert "tensor_parallel=3 does not divide num_attention_heads=4" in capsys.readouterr().err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_cli_refuses_to_overwrite(work, capsys, convert_tool):
    code = convert_tool("mcore-to-hf", "--model", "qwen3", "--mcore-dir",
                      str(work["root"] / "mc_tied"), "--hf-dir", str(work["root"] / "hf_tied"))
    assert code == 2 and "--overwrite" in capsys.readouterr().err


def test_cli_finevit_vl_without_model_config(tmp_path, capsys, convert_tool):
    code = convert_tool("mcore-to-hf", "--model", "finevit-vl", "--mcore-dir", str(tmp_path),
                      "--hf-dir", str(tmp_path / "out"))
    assert code == 2 and "model_config.json not found" in capsys.readouterr().err


@pytest.mark.parametrize("config, message", [
    (tiny_qwen3(ffn_hidden_size=128), r"decoder.layers.mlp.linear_fc2.weight has shape \(4, 64, 96\), "
                                      r"the config implies \(4, 64, 128\)"),
    (tiny_qwen3(tie_embeddings=False), r"missing tensors \(1\): output_layer.weight"),
    (tiny_qwen3(num_layers=3), r"decoder.layers.self_attention.linear_qkv.weight has shape "
                               r"\(4, 128, 64\), the config implies \(3, 128, 64\)"),
])
def test_export_rejects_config_checkpoint_mismatch(work, tmp_path, config, message):
    from megatron_finevit.convert.registry import ConversionError

    with pytest.raises(ConversionError, match=message):
        megatron_to_hf("qwen3", str(work["root"] / "mc_tied"), str(tmp_path / "hf"),
                       config=config, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_export_rejects_unexpected_model_tensor(work, tmp_path):
    from megatron_finevit.convert.registry import ConversionError

    with pytest.raises(ConversionError, match=r"unexpected tensors \(1\): output_layer.weight"):
        megatron_to_hf("qwen3", str(work["root"] / "mc_untied"), str(tmp_path / "hf"),
                       config=tiny_qwen3(tie_embeddings=True), progress=False)


def test_failed_export_leaves_nothing(work, tmp_path, monkeypatch):
    """A failure after some shards were written (here: the third layer) leaves no output and no
    staging directory behind."""
    from megatron_finevit.convert import io

    calls = []
    original = io.ShardedSafetensorsWriter.add

    def failing_add(self, name, tensor):
        calls.append(name)
        if name.startswith("model.layers.2."):
            raise OSError("disk full")
        return original(self, name, tensor)

    monkeypatch.setattr(io.ShardedSafetensorsWriter, "add", failing_add)
    with pytest.raises(OSError, match="disk full"):
        megatron_to_hf("qwen3", str(work["root"] / "mc_untied"), str(tmp_path / "hf"),
                       max_shard_bytes=2**20, progress=False)
    assert len(calls) > 10 and list(tmp_path.iterdir()) == []


def test_export_reads_one_layer_at_a_time(work, tmp_path, monkeypatch):
    """Memory bound: no checkpoint read asks for more than one layer's tensors (or the
    non-layer tensors: embedding, final norm, output layer)."""
    from megatron_finevit.convert.mcore_io import MegatronCheckpointReader

    requests = []
    original = MegatronCheckpointReader.load

    def recording_load(self, wanted):
        requests.append(wanted)
        return original(self, wanted)

    monkeypatch.setattr(MegatronCheckpointReader, "load", recording_load)
    megatron_to_hf("qwen3", str(work["root"] / "mc_untied"), str(tmp_path / "hf"), progress=False)
    layers = [{layer for _, layer in r} for r in requests]
    assert layers == [{None}] + [{i} for i in range(4)]
