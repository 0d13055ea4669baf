"""SigLIP2 text tower: presets match the public checkpoint, validation names problems, the
position stretch keeps the first rows (and the pooled last one) and interpolates the rest, the
stretched tower equals transformers' model given the same table, and freezing is seen by a torch
optimiser and by megatron's DDP grad buffers."""


import numpy as np
import pytest
import torch

from megatron_finevit.config.text import siglip2_giant_text, text_preset, tiny_text
from megatron_finevit.testing import text_parity
from megatron_finevit.testing.multirank import run_world

TOL = 1e-5


def test_giant_preset_is_siglip2_g_opt_text_encoder():
    # big_vision SigLIP2_demo.ipynb: g-opt pairs with a So400m text encoder (width 1152, depth 27,
    # mlp 4304, 16 heads), out_dim 1536, vocab 256k, 64 tokens.
    c = siglip2_giant_text()
    assert (c.num_layers, c.hidden_size, c.ffn_hidden_size, c.num_attention_heads, c.head_dim,
            c.projection_size, c.vocab_size, c.max_position_embeddings, c.norm_eps) == (
        27, 1152, 4304, 16, 72, 1536, 256_000, 64, 1e-6)
    assert c.padded_vocab_size == 256_000
    c.validate(tensor_parallel=8)
    assert text_preset("siglip2_giant_text") == c


def test_giant_parameter_count_matches_transformers():
    """Our config's parameter count (embedding, layers, head) equals transformers'
    ``Siglip2TextModel`` built on the meta device from the exported config.json."""
    from transformers import Siglip2TextConfig, Siglip2TextModel

    from megatron_finevit.convert.siglip2_text import CONVERTER

    c = siglip2_giant_text()
    hf = {k: v for k, v in CONVERTER.hf_config(c, torch.bfloat16).items()
          if k not in ("architectures", "model_type", "dtype")}
    with torch.device("meta"):
        reference = sum(p.numel() for p in Siglip2TextModel(Siglip2TextConfig(**hf)).parameters())
    ours = sum(int(np.prod(m.megatron_shape())) * (c.num_layers if m.per_layer else 1)
               for m in CONVERTER.mappings(c))
    assert ours == reference
    assert 0.70e9 < ours < 0.72e9


@pytest.mark.parametrize("kwargs, message", [
    (dict(tensor_parallel=3), "tensor_parallel=3 does not divide num_attention_heads=4"),
    (dict(pipeline_parallel=2), "use pipeline_parallel=1"),
    (dict(context_parallel=2), "context parallelism is not supported"),
])
def test_validation_names_the_problem(kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny_text().validate(**kwargs)


def test_validation_rejects_bad_shapes():
    with pytest.raises(ValueError, match="num_attention_heads=5 does not divide hidden_size=64"):
        tiny_text(num_attention_heads=5).validate()
    with pytest.raises(ValueError, match="spec_backend"):
        tiny_text(spec_backend="cuda").validate()


# --- position stretching (pure torch) ---------------------------------------------------------


def test_stretch_keeps_first_and_last_rows_and_interpolates_the_tail():
    from megatron_finevit.models.text_tower import stretch_position_embeddings

    table = torch.randn(64, 8, dtype=torch.float64)
    keep = 20
    out = stretch_position_embeddings(table, 256, keep=keep)
    assert out.shape == (256, 8) and out.dtype == table.dtype
    assert torch.equal(out[:keep], table[:keep])
    assert torch.equal(out[-1], table[-1])  # the pooled (last) position keeps its embedding
    # Independent oracle: numpy's piecewise-linear interpolation of each column of the tail.
    old_x = np.arange(keep, 64)
    new_x = keep + np.arange(256 - keep) * (63 - keep) / (255 - keep)
    expected = np.stack([np.interp(new_x, old_x, table[keep:, j].numpy()) for j in range(8)], 1)
    np.testing.assert_allclose(out[keep:].numpy(), expected, atol=1e-6)


def test_stretch_validates_its_arguments():
    from megatron_finevit.models.text_tower import stretch_position_embeddings

    table = torch.randn(16, 4)
    with pytest.raises(ValueError, match="cannot stretch 16 positions down to 8"):
        stretch_position_embeddings(table, 8)
    with pytest.raises(ValueError, match=r"keep=20 must be in \[0, 14\]"):
        stretch_position_embeddings(table, 64)  # default keep=20 does not fit a 16-row table
    assert torch.equal(stretch_position_embeddings(table, 16, keep=4), table)


def test_trainable_schedule():
    from megatron_finevit.models.text_tower import text_tower_trainable

    assert [text_tower_trainable(s, 3) for s in range(5)] == [False, False, False, True, True]
    assert text_tower_trainable(0, None)


# --- the tower itself (one spawned world) ------------------------------------------------------

KEEP, NEW_LEN = 5, 64  # tiny tower: 16 -> 64 positions (the paper's 64 -> 256 is the same 4x)


@pytest.fixture(scope="module")
def worlds(tmp_path_factory):
    from megatron_finevit.convert.pipeline import hf_to_megatron

    root = tmp_path_factory.mktemp("text_tower")
    config = tiny_text()
    hf_model = text_parity.random_hf_text_model(config)
    hf_model.save_pretrained(root / "hf")
    hf_to_megatron("siglip2-text", str(root / "hf"), str(root / "mcore"), progress=False)
    ids = text_parity.caption_ids(NEW_LEN)
    (result,) = run_world(text_parity.tower_world, 1,
                          args=(config, str(root / "mcore"), NEW_LEN, KEEP, ids,
                                text_parity.caption_ids(config.max_position_embeddings)))
    return {"hf": hf_model, "ids": ids, **result}


def test_extension_keeps_first_rows_and_sets_the_new_length(worlds):
    ext = worlds["extension"]
    assert ext["before"].shape == (16, 64) and ext["after"].shape == (NEW_LEN, 64)
    assert ext["context_length"] == ext["config_context"] == NEW_LEN
    assert torch.equal(ext["after"][:KEEP], ext["before"][:KEEP])
    assert torch.equal(ext["after"][-1], ext["before"][-1])
    assert ext["tagged"]  # the new position parameter is still selected as a tower parameter


def test_extended_tower_equals_transformers_with_the_stretched_table(worlds):
    """At 64 tokens our stretched tower equals transformers' model given the same weights and
    our stretched table (transformers itself cannot exceed its 16 positions)."""
    from transformers import Siglip2TextModel

    ext, hf = worlds["extension"], worlds["hf"]
    long_hf = Siglip2TextModel(replace_config(hf.config, max_position_embeddings=NEW_LEN)).eval()
    state = dict(hf.state_dict())
    state["embeddings.position_embedding.weight"] = ext["after"]
    long_hf.load_state_dict(state)
    ref = text_parity.hf_outputs(long_hf, worlds["ids"])
    assert ext["pooled"].shape == (len(text_parity.CAPTIONS), 48)
    assert (ext["pooled"] - ref["pooled"]).abs().max() <= TOL
    assert (ext["hidden"] - ref["hidden"]).abs().max() <= TOL
    assert ref["pooled"].abs().max() > 0.1  # not a degenerate output


def replace_config(hf_config, **changes):
    return hf_config.__class__(**{**hf_config.to_dict(), **changes})


def test_freeze_and_unfreeze_flip_requires_grad_and_the_optimizer_sees_it(worlds):
    f = worlds["freeze"]
    assert f["param_key_selects_tower"]
    assert not any(f["frozen_requires_grad"]) and all(f["unfrozen_requires_grad"])
    assert f["frozen_step"] == (False, True)    # tower weights untouched, the rest trained
    assert f["unfrozen_step"] == (True, True)   # both trained


def test_freezing_after_ddp_wrap_zeroes_the_tower_grad_buffer(worlds):
    f = worlds["freeze"]
    assert all(n == 0.0 for n in f["ddp_frozen_grad_norms"])
    # Unfrozen, gradients reach the same (wrap-time) buffers again.
    assert sum(n > 0 for n in f["ddp_unfrozen_grad_norms"]) == len(f["ddp_unfrozen_grad_norms"])
