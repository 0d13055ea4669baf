"""The ``local`` and ``te`` layer specs save the same dist-checkpoint keys, and the LLM validates
its spec / FP8 keys as the encoder does.

TransformerEngine cannot be imported here, so the ``te`` names are written out from TE's module
structure as megatron-core 0.19.2 assembles it (``models/gpt/gpt_layer_specs.py``,
``get_gpt_layer_with_transformer_engine_submodules``; our ``models/specs.py`` builds the same
layout from ``TESpecProvider``):

- ``linear_qkv`` / ``mlp.linear_fc1`` are ``TELayerNormColumnParallelLinear`` (TE
  ``LayerNormLinear``): ``weight`` [+ ``bias``], the fused pre-norm's ``layer_norm_weight``
  [+ ``layer_norm_bias`` for LayerNorm], and ``_extra_state`` (FP8 metadata);
  ``input_layernorm`` / ``pre_mlp_layernorm`` are ``IdentityOp`` (nothing saved);
- ``linear_proj`` / ``mlp.linear_fc2`` are ``TERowParallelLinear``: ``weight`` [+ ``bias``],
  ``_extra_state``;
- ``q_layernorm`` / ``k_layernorm`` and the final norm are ``TENorm``: ``weight`` [+ ``bias``];
- ``core_attention`` is ``TEDotProductAttention``: nothing (its ``sharded_state_dict`` saves only a
  learnable softmax offset, which vanilla softmax has not).

Checkpoint keys are megatron's ``ShardedTensor.key``: stacked layers share one key
(``decoder.layers.<name>``) and differ in their offset along a leading layer axis. Not compared:
TE's norms are TE ops with FP8 ``_extra_state`` objects of their own (no weights) that torch norms
lack, so a cross-backend load must tolerate those objects.
"""

from __future__ import annotations

import pytest

from megatron_finevit.config.llm import Qwen3Config, tiny_qwen3
from megatron_finevit.config.text import tiny_text
from megatron_finevit.config.vit import tiny_vit
from megatron_finevit.config.vlm import FineViTVLConfig
from megatron_finevit.models.specs import BackendUnavailable
from megatron_finevit.testing.multirank import run_world

NUM_LAYERS = 2


def te_layer_tensors(bias: bool, layernorm_bias: bool, qk_norm: bool) -> set[str]:
    """A TE transformer layer's tensor names (see the module docstring)."""
    names = {"self_attention.linear_qkv.weight", "self_attention.linear_qkv.layer_norm_weight",
             "self_attention.linear_proj.weight", "mlp.linear_fc1.weight",
             "mlp.linear_fc1.layer_norm_weight", "mlp.linear_fc2.weight"}
    if layernorm_bias:
        names |= {"self_attention.linear_qkv.layer_norm_bias", "mlp.linear_fc1.layer_norm_bias"}
    if bias:
        names |= {f"{linear}.bias" for linear in ("self_attention.linear_qkv",
                                                  "self_attention.linear_proj",
                                                  "mlp.linear_fc1", "mlp.linear_fc2")}
    if qk_norm:
        names |= {"self_attention.q_layernorm.weight", "self_attention.k_layernorm.weight"}
    return names


TE_LINEAR_EXTRA_STATES = {f"decoder.layers.{linear}._extra_state" for linear in (
    "self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2")}

# Per model: TE's checkpoint tensors (keys), besides the layers'.
EXPECTED = {
    "llm": (te_layer_tensors(bias=False, layernorm_bias=False, qk_norm=True),
            {"embedding.word_embeddings.weight", "decoder.final_layernorm.weight",
             "output_layer.weight"}),
    "vit": (te_layer_tensors(bias=False, layernorm_bias=False, qk_norm=False),
            {"patch_embed.proj.weight", "decoder.final_layernorm.weight"}),
    "text": (te_layer_tensors(bias=True, layernorm_bias=True, qk_norm=False),
             {"embedding.word_embeddings.weight", "embedding.position_embeddings.weight",
              "decoder.final_layernorm.weight", "decoder.final_layernorm.bias",
              "head.weight", "head.bias"}),
}


def sharded_keys_world(rank: int, world_size: int) -> dict:
    """Each tower built with the local spec on one rank: its ShardedTensor keys with the layer
    offset of each (None outside the layer stack), and its ShardedObject keys."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor

    from megatron_finevit.models.llm import build_qwen3
    from megatron_finevit.models.text_tower import SigLIPTextTower
    from megatron_finevit.models.vit import FineViTModel
    from megatron_finevit.platform import ParallelConfig, init_parallel

    init_parallel(ParallelConfig())
    llm = tiny_qwen3(num_layers=NUM_LAYERS, vocab_size=256, tie_embeddings=False)
    vit, text = tiny_vit(num_layers=NUM_LAYERS), tiny_text(num_layers=NUM_LAYERS)
    models = {"llm": build_qwen3(llm, llm.to_transformer_config()),
              "vit": FineViTModel(vit, vit.to_transformer_config()),
              "text": SigLIPTextTower(text, text.to_transformer_config())}
    report = {}
    for name, model in models.items():
        tensors, objects = [], []
        for entry in model.sharded_state_dict().values():
            if isinstance(entry, ShardedObject):
                objects.append(entry.key)
                continue
            # the gated fc1 is a ShardedTensorFactory around a ShardedTensor of the same key
            tensor = entry if isinstance(entry, ShardedTensor) else entry.data
            stacked = entry.key.startswith("decoder.layers.") and isinstance(entry, ShardedTensor)
            layer = tensor.global_offset[0] if stacked else None
            tensors.append((entry.key, layer))
        report[name] = {"tensors": tensors, "objects": objects}
    return report


@pytest.fixture(scope="module")
def keys():
    (report,) = run_world(sharded_keys_world, 1)
    return report


@pytest.mark.parametrize("model", sorted(EXPECTED))
def test_local_spec_saves_te_checkpoint_keys(keys, model):
    layer_names, other = EXPECTED[model]
    expected = {f"decoder.layers.{n}" for n in layer_names} | other
    saved = {key for key, _ in keys[model]["tensors"]}
    assert saved == expected
    # e.g. the local input norm is saved as TE's fused one
    assert "decoder.layers.self_attention.linear_qkv.layer_norm_weight" in saved
    assert not any("input_layernorm" in k or "pre_mlp_layernorm" in k for k in saved)
    # each layer's tensors sit at its own offset of the stacked layer axis
    offsets = [layer for key, layer in keys[model]["tensors"]
               if key == "decoder.layers.self_attention.linear_qkv.layer_norm_weight"]
    assert sorted(offsets) == list(range(NUM_LAYERS))
    # the linear layers' extra-state objects carry TE's names too
    assert set(keys[model]["objects"]) == TE_LINEAR_EXTRA_STATES


# --- the LLM's spec_backend / fp8 keys ------------------------------------------------------------


@pytest.mark.parametrize("changes, message", [
    (dict(fp8="hybrid"), "fp8='hybrid' needs spec_backend='te'"),
    (dict(spec_backend="cuda"), "spec_backend='cuda' must be one of"),
    (dict(fp8="e5m2"), "fp8='e5m2' must be one of"),
    (dict(fp8_recipe="fancy"), "fp8_recipe='fancy' must be one of"),
])
def test_llm_spec_and_fp8_errors_are_clear(changes, message):
    with pytest.raises(ValueError, match=message):
        tiny_qwen3(**changes).validate()
    # and through the VLM config, naming the tower
    vl = FineViTVLConfig(vit=tiny_vit(), llm=tiny_qwen3(**changes))
    with pytest.raises(ValueError, match=f"language model: .*{message}"):
        vl.validate()


def test_llm_te_backend_without_transformer_engine_fails_at_config_time():
    with pytest.raises(BackendUnavailable, match="TransformerEngine"):
        tiny_qwen3(spec_backend="te", fp8="hybrid").to_transformer_config()


def test_build_qwen3_takes_its_spec_from_the_config():
    """A te config fails to build without TE even with a TransformerConfig made elsewhere (the
    factory used to build the local spec whatever the config said)."""
    from dataclasses import replace

    from megatron_finevit.models.llm import build_qwen3

    local = tiny_qwen3(num_layers=1, vocab_size=256)
    with pytest.raises(BackendUnavailable, match="TransformerEngine"):
        build_qwen3(replace(local, spec_backend="te"), local.to_transformer_config(),
                    pre_process=True, post_process=True)


def test_llm_spec_keys_round_trip_and_reach_megatron():
    llm = tiny_qwen3(fp8_recipe="tensorwise")
    assert Qwen3Config.from_dict(llm.to_dict()) == llm
    vl = FineViTVLConfig(vit=tiny_vit(), llm=llm)
    assert FineViTVLConfig.from_dict(vl.to_dict()).llm.fp8_recipe == "tensorwise"
    transformer_config = llm.to_transformer_config()
    assert transformer_config.fp8 is None and transformer_config.fp8_recipe == "tensorwise"
