"""SigLIP2 text tower HF <-> megatron conversion against transformers' ``Siglip2TextModel`` (the
external oracle), on a tiny random model and real captions tokenized by SentencePiece:

- HF -> megatron (through ``tools/convert_checkpoint.py``), loaded at TP1, TP2 and TP2+SP:
  pooled output and last hidden states equal transformers' (fp32, <= 1e-5), every rank holds
  exactly the registry's TP shard;
- HF -> megatron -> HF is bit-exact and loads in transformers;
- a tower stretched 4x and saved at TP2+SP exports to a transformers model with the same outputs;
- the text half of a two-tower ``SiglipModel`` / ``Siglip2Model`` checkpoint converts to the same
  tensors as the standalone text model; bad inputs fail before compute, naming the problem.
"""

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch

from megatron_finevit.config.text import tiny_text
from megatron_finevit.convert.io import SafetensorsReader
from megatron_finevit.convert.registry import ConversionError
from megatron_finevit.testing import text_parity
from megatron_finevit.testing.multirank import run_world

TOL = 1e-5
KEEP = 5
LAYOUTS = [(1, False), (2, False), (2, True)]
REPO = Path(__file__).resolve().parents[2]


def convert_cli(*argv: str) -> int:
    spec = importlib.util.spec_from_file_location("convert_checkpoint",
                                                  REPO / "tools" / "convert_checkpoint.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main([*argv, "--no-progress"])


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("siglip2_text")
    config = tiny_text()
    hf_model = text_parity.random_hf_text_model(config)
    hf_model.save_pretrained(root / "hf")
    proto = text_parity.sentencepiece_proto()
    ids = text_parity.caption_ids(config.max_position_embeddings, proto)
    long_ids = text_parity.caption_ids(4 * config.max_position_embeddings, proto)
    assert convert_cli("hf-to-mcore", "--model", "siglip2-text", "--hf-dir", str(root / "hf"),
                       "--mcore-dir", str(root / "mcore"), "--tp", "2") == 0
    assert convert_cli("mcore-to-hf", "--model", "siglip2-text", "--mcore-dir",
                       str(root / "mcore"), "--hf-dir", str(root / "hf_back")) == 0
    ranks = run_world(text_parity.layouts_world, 2, args=(
        config, str(root / "mcore"), ids, LAYOUTS, str(root / "extended"), long_ids, KEEP))
    return dict(root=root, config=config, hf=hf_model, ids=ids, long_ids=long_ids, ranks=ranks,
                oracle=text_parity.hf_outputs(hf_model, ids))


@pytest.mark.parametrize("layout", ["tp1", "tp2", "tp2_sp"])
def test_converted_tower_matches_transformers(work, layout):
    oracle = work["oracle"]
    for rank in work["ranks"]:
        out = rank[layout]
        assert out["pooled"].shape == oracle["pooled"].shape == (len(text_parity.CAPTIONS), 48)
        assert out["hidden"].shape == oracle["hidden"].shape
        assert (out["pooled"] - oracle["pooled"]).abs().max() <= TOL
        assert (out["hidden"] - oracle["hidden"]).abs().max() <= TOL
        assert out["tensors"] == 30 and out["shard_max_abs"] == 0.0
    assert oracle["pooled"].abs().max() > 0.1  # not a degenerate output


def test_captions_are_real_tokenized_text(work):
    ids = work["ids"]
    assert all(1 in row for row in ids.tolist())  # every row carries EOS (id 1)
    assert (ids[:, -1] == 0).any()  # short captions are padded, so the pooled token is padding
    assert len({tuple(r) for r in ids.tolist()}) == len(text_parity.CAPTIONS)
    assert ids.max() < work["config"].vocab_size


def test_round_trip_is_bit_exact(work):
    from transformers import Siglip2TextModel

    original = SafetensorsReader(work["root"] / "hf")
    back = SafetensorsReader(work["root"] / "hf_back")
    assert back.keys() == original.keys()
    for name in original.keys():
        assert torch.equal(back.get(name), original.get(name)), name
    reloaded = Siglip2TextModel.from_pretrained(work["root"] / "hf_back").eval()
    out = text_parity.hf_outputs(reloaded, work["ids"])
    assert torch.equal(out["pooled"], work["oracle"]["pooled"])


def test_stretched_tower_saved_at_tp2_sp_exports_to_an_equal_transformers_model(work):
    from transformers import Siglip2TextModel

    from megatron_finevit.convert.pipeline import megatron_to_hf

    root, config = work["root"], work["config"]
    extended = tiny_text(max_position_embeddings=4 * config.max_position_embeddings)
    megatron_to_hf("siglip2-text", str(root / "extended"), str(root / "hf_extended"),
                   config=extended, progress=False)
    exported = Siglip2TextModel.from_pretrained(root / "hf_extended").eval()
    assert exported.config.max_position_embeddings == 64
    reference = text_parity.hf_outputs(exported, work["long_ids"])
    for rank in work["ranks"]:
        assert (rank["extended"]["pooled"] - reference["pooled"]).abs().max() <= TOL
        assert (rank["extended"]["hidden"] - reference["hidden"]).abs().max() <= TOL
    original = work["hf"].embeddings.position_embedding.weight
    stretched = exported.embeddings.position_embedding.weight
    assert torch.equal(stretched[:KEEP], original[:KEEP])
    assert torch.equal(stretched[-1], original[-1])


@pytest.mark.parametrize("model_type", ["siglip", "siglip2"])
def test_two_tower_checkpoint_converts_its_text_half(work, model_type, tmp_path):
    """The giant checkpoint is a two-tower ``SiglipModel``: its text tower converts to the same
    megatron tensors as the standalone model; the image tower and logit scale/bias are skipped,
    while a stray tensor is still reported."""
    import transformers

    from megatron_finevit.convert.mcore_io import MegatronCheckpointReader
    from megatron_finevit.convert.pipeline import hf_to_megatron

    classes = {"siglip": ("SiglipConfig", "SiglipModel"),
               "siglip2": ("Siglip2Config", "Siglip2Model")}
    config_cls, model_cls = (getattr(transformers, n) for n in classes[model_type])
    text = {k: v for k, v in work["hf"].config.to_dict().items()
            if k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "max_position_embeddings", "projection_size")}
    two_tower = model_cls(config_cls(text_config=text, vision_config=dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4)))
    two_tower.text_model.load_state_dict(work["hf"].state_dict())
    two_tower.save_pretrained(tmp_path / "hf")
    hf_to_megatron("siglip2-text", str(tmp_path / "hf"), str(tmp_path / "mcore"), progress=False)
    ours, reference = (MegatronCheckpointReader(tmp_path / "mcore"),
                       MegatronCheckpointReader(work["root"] / "mcore"))
    assert ours.keys() == reference.keys()
    for key in reference.keys():
        (a,), (b,) = ours.load([(key, None)]).values(), reference.load([(key, None)]).values()
        assert torch.equal(a, b), key

    from safetensors.torch import load_file, save_file

    tensors = load_file(tmp_path / "hf" / "model.safetensors")
    save_file({**tensors, "text_model.stray.weight": torch.zeros(2)},
              tmp_path / "hf" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ConversionError, match=r"unexpected tensors \(1\): text_model.stray.weight"):
        hf_to_megatron("siglip2-text", str(tmp_path / "hf"), str(tmp_path / "mcore2"),
                       progress=False)


def _edited_copy(work, tmp_path, **changes) -> Path:
    target = tmp_path / "hf"
    shutil.copytree(work["root"] / "hf", target)
    config = json.loads((target / "config.json").read_text())
    (target / "config.json").write_text(json.dumps({**config, **changes}))
    return target


@pytest.mark.parametrize("changes, message", [
    (dict(model_type="bert"), "model_type='bert'"),
    (dict(hidden_act="relu"), "hidden_act='relu'"),
    (dict(intermediate_size=80), r"encoder.layers.0.mlp.fc1.weight has shape \(96, 64\), the "
                                 r"config implies \(80, 64\)"),
])
def test_bad_checkpoints_fail_before_compute(work, tmp_path, changes, message):
    from megatron_finevit.convert.pipeline import hf_to_megatron

    source = _edited_copy(work, tmp_path, **changes)
    with pytest.raises(ConversionError, match=message):
        hf_to_megatron("siglip2-text", str(source), str(tmp_path / "out"), progress=False)
    assert not (tmp_path / "out").exists()


def test_cli_reports_a_layout_that_does_not_split(work, tmp_path, capsys):
    # 4 heads do not split over TP 3: refused before any conversion, with exit code 2.
    assert convert_cli("hf-to-mcore", "--model", "siglip2-text", "--hf-dir",
                       str(work["root"] / "hf"), "--mcore-dir", str(tmp_path / "out"),
                       "--tp", "3") == 2
    assert "tensor_parallel=3 does not divide num_attention_heads=4" in capsys.readouterr().err


def test_giant_two_tower_config_translates_to_the_preset():
    """config.json of ``google/siglip2-giant-opt-patch16-256`` (a two-tower ``SiglipModel``; the
    fields it sets — omitted ones take transformers' defaults, e.g. 64 positions, ε 1e-6):
    the text half becomes our ``siglip2_giant_text`` preset, and the whole image tower plus the
    logit scale / bias are skipped by exact name."""
    from dataclasses import fields

    from megatron_finevit.config.text import SigLIP2TextConfig, siglip2_giant_text
    from megatron_finevit.convert.siglip2_text import CONVERTER

    published = {
        "architectures": ["SiglipModel"], "model_type": "siglip",
        "text_config": {"hidden_size": 1152, "intermediate_size": 4304,
                        "model_type": "siglip_text_model", "num_attention_heads": 16,
                        "num_hidden_layers": 27, "projection_size": 1536, "vocab_size": 256000},
        "vision_config": {"hidden_size": 1536, "image_size": 256, "intermediate_size": 6144,
                          "model_type": "siglip_vision_model", "num_attention_heads": 16,
                          "num_hidden_layers": 40, "patch_size": 16},
    }
    config = CONVERTER.config_from_hf(published)
    architecture = [f.name for f in fields(SigLIP2TextConfig) if not f.name.endswith("token_id")]
    preset = siglip2_giant_text()
    assert all(getattr(config, n) == getattr(preset, n) for n in architecture)
    # The source fields (prefix, skipped names) stay out of the checkpoint's model_config.json.
    assert config.to_dict().keys() == preset.to_dict().keys()
    assert config.hf_prefix == "text_model."
    skipped = CONVERTER.ignored_hf_keys(config)
    assert {"logit_scale", "logit_bias", "vision_model.head.probe",
            "vision_model.encoder.layers.39.mlp.fc2.bias"} <= skipped
    assert not any(k.startswith("text_model.") for k in skipped)
