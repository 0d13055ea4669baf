"""FineViT megatron <-> HF conversion against the transformers export class, on a tiny random
encoder and a pack of three images of different sizes:

- megatron (saved as a trainer saves) -> HF: ``AutoModel.from_pretrained`` gives megatron's
  features (fp32, <= 1e-5);
- HF -> megatron: the re-imported checkpoint gives the same features again;
- HF (``save_pretrained``) -> megatron -> HF is bit-exact, also through the command-line tool;
- the FineViT-VL image path (export + the megatron merge projector's weights) equals megatron's
  FineViT + MergeProjector.
"""

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_finevit.convert.io import SafetensorsReader
from megatron_finevit.convert.pipeline import megatron_to_hf
from megatron_finevit.testing.finevit_hf_parity import (
    LLM_DIM,
    VIT,
    export_world,
    hf_inputs,
    parity_images,
)
from megatron_finevit.testing.multirank import run_world

TOL = 1e-5
REPO = Path(__file__).resolve().parents[2]


def _hf():
    import megatron_finevit.hf as hf  # registers the classes with transformers' Auto*

    return hf


def _random_hf_model(path: Path):
    hf = _hf()
    config = hf.FineViTHFConfig(hidden_size=VIT.hidden_size, intermediate_size=VIT.ffn_hidden_size,
                                num_hidden_layers=3, num_attention_heads=VIT.num_attention_heads)
    torch.manual_seed(7)
    model = hf.FineViTHFModel(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(path)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("finevit_convert")
    _random_hf_model(root / "saved_hf")
    names = ("mc", "hf", "mc_reimported", "saved_hf", "mc_saved", "mc_wrapped", "hf_wrapped")
    dirs = {name: str(root / name) for name in names}
    (result,) = run_world(export_world, 1, args=tuple(dirs[n] for n in names[:5]) + (
        dirs["mc_wrapped"], dirs["hf_wrapped"]))
    return dict(root=root, dirs=dirs, result=result)


def _hf_features(model) -> torch.Tensor:
    pixel_values, grids = hf_inputs(parity_images())
    with torch.no_grad():
        return model(pixel_values=pixel_values, image_grid_thw=grids).last_hidden_state


def _max_diff(a, b):
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


def test_export_loads_with_automodel_and_matches_megatron(work):
    from transformers import AutoModel

    hf = _hf()
    model = AutoModel.from_pretrained(work["dirs"]["hf"]).eval()
    assert type(model) is hf.FineViTHFModel
    megatron = work["result"]["features"]
    assert megatron.shape == (24 + 4 + 24, VIT.hidden_size)
    assert megatron.std() > 0.1  # a real, non-degenerate signal
    assert _max_diff(_hf_features(model), megatron) <= TOL
    config = json.loads(Path(work["dirs"]["hf"], "config.json").read_text())
    assert config["model_type"] == "finevit" and config["num_hidden_layers"] == VIT.num_layers


def test_hf_to_megatron_gives_the_same_features(work):
    result = work["result"]
    assert result["reimport_tensors"] == 2 + 6 * VIT.num_layers  # patch embed, final norm + 6/layer
    assert _max_diff(result["reimported_features"], result["features"]) <= TOL


def _assert_same_tensors(a: Path, b: Path):
    original, exported = SafetensorsReader(a), SafetensorsReader(b)
    assert exported.keys() == original.keys()
    for key in original.keys():
        assert torch.equal(exported.get(key), original.get(key)), key


def test_round_trip_is_bit_exact(work, tmp_path):
    out = tmp_path / "back"
    megatron_to_hf("finevit", work["dirs"]["mc_saved"], str(out), progress=False)
    _assert_same_tensors(Path(work["dirs"]["saved_hf"]), out)
    want = json.loads(Path(work["dirs"]["saved_hf"], "config.json").read_text())
    got = json.loads((out / "config.json").read_text())
    for field in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "patch_size", "merge_size", "rope_theta", "rms_norm_eps"):
        assert got[field] == want[field], field


def test_cli_round_trip(work, tmp_path):
    out = tmp_path / "cli"
    result = subprocess.run(
        [sys.executable, str(REPO / "tools" / "convert_checkpoint.py"), "mcore-to-hf",
         "--model", "finevit", "--mcore-dir", work["dirs"]["mc_reimported"], "--hf-dir", str(out),
         "--no-progress"],
        capture_output=True, text=True, cwd=REPO, timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr
    _assert_same_tensors(Path(work["dirs"]["hf"]), out)


def test_vl_image_features_equal_megatron_vit_plus_projector(work):
    hf = _hf()
    from transformers import AutoConfig

    vision = AutoConfig.from_pretrained(work["dirs"]["hf"])
    config = hf.FineViTVLHFConfig(
        vision_config=vision.to_dict(),
        text_config=dict(model_type="qwen3", vocab_size=64, hidden_size=LLM_DIM,
                         intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, head_dim=20))
    model = hf.FineViTVLForConditionalGeneration(config).eval()
    model.visual.load_state_dict(hf.FineViTHFModel.from_pretrained(work["dirs"]["hf"]).state_dict())
    model.projector.load_state_dict(work["result"]["projector_state"])
    pixel_values, grids = hf_inputs(parity_images())
    with torch.no_grad():
        features = model.get_image_features(pixel_values, grids)
    assert _max_diff(features, work["result"]["projected"]) <= TOL


def test_bad_hf_checkpoints_fail_before_converting(work, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from megatron_finevit.convert.pipeline import hf_to_megatron
    from megatron_finevit.convert.registry import ConversionError, get_converter

    with pytest.raises(ConversionError, match="model_type"):
        get_converter("finevit").config_from_hf({"model_type": "qwen3"})
    broken = tmp_path / "broken"
    shutil.copytree(work["dirs"]["saved_hf"], broken)
    tensors = load_file(broken / "model.safetensors")
    del tensors["layers.1.mlp.up_proj.weight"]
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ConversionError, match="missing tensors.*layers.1.mlp.up_proj"):
        hf_to_megatron("finevit", str(broken), str(tmp_path / "out"), progress=False)
    assert not (tmp_path / "out").exists()


def test_trainer_checkpoint_exports_through_its_prefix(work):
    """A Stage I/II checkpoint holds the encoder under ``encoder.`` next to other modules (the
    mask token here): --megatron-prefix exports exactly the bare encoder's files."""
    _assert_same_tensors(Path(work["dirs"]["hf"]), Path(work["dirs"]["hf_wrapped"]))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _modes(root: Path) -> dict[str, int]:
    """Permission bits of ``root`` and everything below it, by path relative to ``root``."""
    return {str(p.relative_to(root)): stat.S_IMODE(p.stat().st_mode)
            for p in [root, *root.rglob("*")]}


def _assert_umask_modes(root: Path, umask: int):
    for name, mode in _modes(root).items():
        want = (0o777 if (root / name).is_dir() else 0o666) & ~umask
        assert mode == want, f"{name}: {oct(mode)}, want {oct(want)} under umask {oct(umask)}"


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_export_permissions_follow_the_umask(work, tmp_path, umask):
    """Clusters share model directories: an export gets mkdir/open's umask-respecting modes
    (0755 / 0644 under umask 022), not a temporary directory's 0700, and tokenizer files do not
    keep a private source file's mode."""
    tokenizer = tmp_path / "tokenizer"
    tokenizer.mkdir()
    (tokenizer / "tokenizer.json").write_text("{}\n")
    (tokenizer / "tokenizer.json").chmod(0o600)
    out = tmp_path / "shared" / "finevit"
    previous = os.umask(umask)
    try:
        megatron_to_hf("finevit", work["dirs"]["mc_saved"], str(out), progress=False)
        _assert_umask_modes(out, umask)
        # replacing an export publishes the same modes
        megatron_to_hf("finevit", work["dirs"]["mc_saved"], str(out), overwrite=True,
                       tokenizer_dir=str(tokenizer), progress=False)
    finally:
        os.umask(previous)
    _assert_umask_modes(out, umask)
    assert (out / "tokenizer.json").is_file()


def test_megatron_checkpoint_from_hf_permissions_follow_the_umask(work):
    """hf-to-mcore publishes through the same staging (converted in the fixture's world)."""
    _assert_umask_modes(Path(work["dirs"]["mc_reimported"]), _umask())
