"""Mapping layouts and TP rules against brute-force constructions, and the safetensors I/O."""

import json

import pytest
import torch

from megatron_finevit.convert.io import SafetensorsReader, ShardedSafetensorsWriter, staged_output
from megatron_finevit.convert.registry import (
    GatedMLPMapping,
    QKVMapping,
    VocabMapping,
    get_converter,
    row_parallel,
)

HEADS, GROUPS, D, H = 8, 2, 3, 5


def _qkv():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(HEADS * D, H, generator=g)
    k = torch.randn(GROUPS * D, H, generator=g)
    v = torch.randn(GROUPS * D, H, generator=g)
    mapping = QKVMapping("x.*.linear_qkv.weight", ("q.*", "k.*", "v.*"),
                         ((HEADS * D, H), (GROUPS * D, H), (GROUPS * D, H)),
                         num_heads=HEADS, num_groups=GROUPS, head_dim=D)
    return mapping, q, k, v


def _brute_force_qkv(q, k, v, groups):
    """Row by row: for each query group, its query heads, then its key head, then its value."""
    per_group = HEADS // GROUPS
    rows = []
    for grp in groups:
        for head in range(grp * per_group, (grp + 1) * per_group):
            rows.append(q[head * D:(head + 1) * D])
        rows.append(k[grp * D:(grp + 1) * D])
        rows.append(v[grp * D:(grp + 1) * D])
    return torch.cat(rows)


def test_qkv_layout_and_tp_shards():
    mapping, q, k, v = _qkv()
    fused = mapping.to_megatron([q, k, v])
    assert torch.equal(fused, _brute_force_qkv(q, k, v, range(GROUPS)))
    assert all(torch.equal(a, b) for a, b in zip(mapping.to_hf(fused), (q, k, v)))
    # TP=2: rank r holds query group r, whole.
    for rank in range(2):
        assert torch.equal(mapping.shard(fused, 2, rank), _brute_force_qkv(q, k, v, [rank]))
    assert torch.equal(mapping.unshard([mapping.shard(fused, 2, r) for r in range(2)]), fused)
    assert mapping.megatron_shape() == ((HEADS + 2 * GROUPS) * D, H)
    assert mapping.megatron_key() == "x.linear_qkv.weight"
    assert mapping.hf_names(3) == ("q.3", "k.3", "v.3")


def test_gated_mlp_tp_rank_holds_its_gate_and_up_slices():
    gate, up = torch.arange(24.).reshape(8, 3), -torch.arange(24.).reshape(8, 3)
    mapping = GatedMLPMapping("fc1", ("gate", "up"), ((8, 3), (8, 3)))
    fused = mapping.to_megatron([gate, up])
    assert torch.equal(fused, torch.cat([gate, up]))
    shard1 = mapping.shard(fused, 2, 1)
    assert torch.equal(shard1, torch.cat([gate[4:], up[4:]]))
    assert torch.equal(mapping.unshard([mapping.shard(fused, 2, r) for r in range(2)]), fused)
    assert [torch.equal(a, b) for a, b in zip(mapping.to_hf(fused), (gate, up))] == [True, True]


def test_vocab_padding_and_stripping():
    table = torch.randn(10, 4)
    mapping = VocabMapping("emb", ("e",), ((10, 4),), padded_rows=16)
    padded = mapping.to_megatron([table])
    assert padded.shape == (16, 4) and torch.equal(padded[:10], table) and not padded[10:].any()
    assert torch.equal(mapping.to_hf(padded)[0], table)
    assert torch.equal(mapping.shard(padded, 2, 1), padded[8:])


def test_row_parallel_splits_input_dim():
    w = torch.randn(4, 6)
    m = row_parallel("proj", "o", (4, 6))
    assert torch.equal(m.shard(w, 3, 2), w[:, 4:])


def test_qwen3_mapping_covers_every_hf_tensor_once():
    from megatron_finevit.config.llm import tiny_qwen3
    from megatron_finevit.convert.registry import expand

    config = tiny_qwen3(tie_embeddings=False)
    names = [n for m, layer in expand(get_converter("qwen3").mappings(config), config.num_layers)
             for n in m.hf_names(layer)]
    assert len(names) == len(set(names)) == 3 + 11 * config.num_layers


def test_writer_shards_and_reader_reads_back(tmp_path):
    tensors = {f"t{i}": torch.full((256,), float(i)) for i in range(5)}  # 1 KiB each
    writer = ShardedSafetensorsWriter(tmp_path, max_shard_bytes=2048)
    for name, t in tensors.items():
        writer.add(name, t)
    files = writer.close()
    assert files == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 5 * 1024
    reader = SafetensorsReader(tmp_path)
    assert reader.keys() == sorted(tensors)
    assert all(torch.equal(reader.get(n), t) for n, t in tensors.items())
    with pytest.raises(ValueError, match="t0 written twice"):
        writer.add("t0", tensors["t0"])


def test_staged_output_publishes_only_on_success(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(RuntimeError, match="boom"):
        with staged_output(target) as staging:
            (staging / "half.bin").write_bytes(b"x")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    with staged_output(target) as staging:
        (staging / "done").write_text("1")
    assert (target / "done").read_text() == "1" and len(list(tmp_path.iterdir())) == 1
    with pytest.raises(FileExistsError, match="--overwrite"):
        with staged_output(target):
            pass
    with staged_output(target, overwrite=True) as staging:
        (staging / "new").write_text("2")
    assert sorted(p.name for p in target.iterdir()) == ["new"]
    assert len(list(tmp_path.iterdir())) == 1
