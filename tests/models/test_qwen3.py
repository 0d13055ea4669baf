"""Qwen3 on megatron-core: presets match the public models, validation catches bad layouts, and
TP2, TP2+SP, PP2 and CP2 give the single-rank logits on real-tokenizer text packed as THD."""

from dataclasses import replace

import pytest
import torch

from megatron_finevit.config.llm import qwen3_preset, tiny_qwen3
from megatron_finevit.testing.multirank import run_world
from megatron_finevit.testing.multirank import Layout
from megatron_finevit.testing.qwen3_parity import layouts_world, oracle_world

TOL = 1e-5
LAYOUTS = [Layout(tp=2), Layout(tp=2, sp=True), Layout(pp=2), Layout(cp=2)]


# Values from the public checkpoints' config.json (Qwen/Qwen3-0.6B, -1.7B, -8B).
@pytest.mark.parametrize("name, layers, hidden, ffn, heads, groups, tied", [
    ("qwen3_0p6b", 28, 1024, 3072, 16, 8, True),
    ("qwen3_1p7b", 28, 2048, 6144, 16, 8, True),
    ("qwen3_8b", 36, 4096, 12288, 32, 8, False),
])
def test_presets_match_public_configs(name, layers, hidden, ffn, heads, groups, tied):
    c = qwen3_preset(name)
    assert (c.num_layers, c.hidden_size, c.ffn_hidden_size, c.num_attention_heads,
            c.num_query_groups, c.head_dim, c.tie_embeddings) == (layers, hidden, ffn, heads,
                                                                 groups, 128, tied)
    assert (c.vocab_size, c.rope_theta, c.norm_eps) == (151936, 1e6, 1e-6)
    assert c.padded_vocab_size == 151936  # already a multiple of 128
    c.validate(tensor_parallel=8, pipeline_parallel=4)


def test_vocabulary_padding_is_independent_of_tp():
    c = tiny_qwen3()
    assert c.vocab_size == 151669 and c.padded_vocab_size == 151680  # next multiple of 128
    assert replace(c, vocab_pad_multiple=1024).padded_vocab_size == 152576


def test_parameter_count_of_8b_preset():
    # Qwen3-8B is published as 8.2B parameters (untied embedding and output layer).
    c = qwen3_preset("qwen3_8b")
    h, f, d = c.hidden_size, c.ffn_hidden_size, c.head_dim
    per_layer = (h * d * (c.num_attention_heads + 2 * c.num_query_groups)
                 + c.num_attention_heads * d * h + 3 * h * f + 2 * h + 2 * d)
    total = c.num_layers * per_layer + 2 * c.vocab_size * h + h
    assert 8.1e9 < total < 8.3e9


@pytest.mark.parametrize("kwargs, message", [
    (dict(tensor_parallel=3), "tensor_parallel=3 does not divide num_attention_heads=4"),
    (dict(tensor_parallel=4), "tensor_parallel=4 does not divide num_query_groups=2"),
    (dict(pipeline_parallel=8), "pipeline_parallel=8 does not divide num_layers=4"),
])
def test_validation_names_the_problem(kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny_qwen3().validate(**kwargs)


@pytest.fixture(scope="module")
def parity(tmp_path_factory):
    ckpt = str(tmp_path_factory.mktemp("qwen3") / "oracle")
    config = tiny_qwen3()
    (oracle,) = run_world(oracle_world, 1, args=(config, ckpt))
    ranks = run_world(layouts_world, 2, args=(config, ckpt, LAYOUTS))
    return oracle, ranks


def test_packed_equals_per_sequence(parity):
    oracle, _ = parity
    per_sequence = torch.cat(oracle["per_sequence"])
    assert oracle["packed"].shape == per_sequence.shape
    assert (oracle["packed"] - per_sequence).abs().max() <= TOL
    assert oracle["packed"].abs().max() > 0.1  # not a degenerate output


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda l: l.label)
def test_layout_matches_single_rank(parity, layout):
    oracle, ranks = parity
    outputs = [r[layout.label]["logits"] for r in ranks if r[layout.label]["logits"] is not None]
    assert len(outputs) == (1 if layout.pp > 1 else 2)
    for logits in outputs:
        assert logits.shape == oracle["packed"].shape
        assert (logits - oracle["packed"]).abs().max() <= TOL
    for r in ranks:  # each rank holds exactly the registry's TP shard of the checkpoint
        assert r[layout.label]["shards"]["tensors"] > 0
        assert r[layout.label]["shards"]["max_abs"] == 0.0
