"""The planner: its FLOP and activation models against the built tiny towers (one spawned world
for the self-check and the parameter counts), ``tools/plan.py``'s output and its user errors, and
a FLOP number worked by hand."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_finevit.config.vit import tiny_vit
from megatron_finevit.planning.flops import vit_tower_flops
from megatron_finevit.testing.multirank import run_world

REPO = Path(__file__).resolve().parents[2]


def measured_world(rank: int, world_size: int) -> dict:
    """The self-check, then ``{module: (planned params, numel of the built module)}``."""
    from megatron_finevit.config.text import tiny_text
    from megatron_finevit.models.heads import MAPHead, MIMHead
    from megatron_finevit.models.llm import build_qwen3
    from megatron_finevit.models.text_tower import build_text_tower
    from megatron_finevit.models.vit import FineViTModel
    from megatron_finevit.models.vlm import FineViTVLModel
    from megatron_finevit.planning import params
    from megatron_finevit.planning.selfcheck import selfcheck_world
    from megatron_finevit.testing.finevit_vl_parity import tiny_vl_config

    result = selfcheck_world(rank, world_size)
    numel = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    vit, text, vl = tiny_vit(), tiny_text(), tiny_vl_config()
    tc = vit.to_transformer_config()
    result["params"] = {
        "vit_mim": (params.vit_params(vit, mask_token=True),
                    numel(FineViTModel(vit, tc, mask_token=True))),
        "mim_head": (params.mim_head_params(vit, 32), numel(MIMHead(tc, 32))),
        "map_head": (params.map_head_params(vit, 48), numel(MAPHead(tc, 48))),
        "text_tower": (params.text_tower_params(text),
                       numel(build_text_tower(text, text.to_transformer_config()))),
        "qwen3": (params.llm_params(vl.llm),
                  numel(build_qwen3(vl.llm, vl.llm.to_transformer_config()))),
        "finevit_vl": (params.vit_params(vl.vit) + params.projector_params(vl)
                       + params.llm_params(vl.llm),
                       numel(FineViTVLModel(vl, *vl.to_transformer_configs()))),
    }
    return result


@pytest.fixture(scope="module")
def measured():
    (result,) = run_world(measured_world, 1)
    return result


def test_flops_within_two_percent_of_the_counter(measured):
    from megatron_finevit.planning.selfcheck import relative_error

    assert set(measured["flops"]) == {"vit", "text_tower", "qwen3", "finevit_vl"}
    assert relative_error(measured["flops"]) < 0.02


def test_activations_within_fifteen_percent_of_saved_bytes(measured):
    from megatron_finevit.planning.selfcheck import relative_error

    assert relative_error(measured["activations"]) < 0.15


def test_parameter_counts_equal_the_built_models(measured):
    for name, (planned, built) in measured["params"].items():
        assert planned == built, name


def test_model_state_bytes_per_parameter():
    from megatron_finevit.planning.memory import state_bytes

    state = state_bytes(1000, 10, model_parallel=2, data_parallel=4)
    assert (state.weights, state.grads, state.optimizer, state.frozen) == (1000, 2000, 1500, 20)


def test_vit_flops_by_hand():
    # tiny ViT, 1 layer (h 64, FFN 96), one 28x28 image = 4 patches of 588 values:
    # patch embed 2·4·588·64 = 301,056; QKV 2·4·64·192 = 98,304; out 2·4·64·64 = 32,768;
    # fc1 2·4·64·192 = 98,304; fc2 2·4·96·64 = 49,152; scores 4·4²·64 = 4,096 -> forward 583,680;
    # trained with nothing before it: 3x, less the patch embedding's input gradient.
    tower = vit_tower_flops(tiny_vit(num_layers=1), [4])
    assert tower.forward == 583_680
    assert tower.forward_backward(True, grad_into=False) == 3 * 583_680 - 301_056


def load_tool():
    spec = importlib.util.spec_from_file_location("plan_tool", REPO / "tools" / "plan.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def values(text: str) -> dict:
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line and " " not in line)


def test_cli_plans_a_stage(capsys):
    tool = load_tool()
    assert tool.main(["--config", "examples/stage1_mim.yaml", "--nodes", "16", "--gpu", "h200"]) == 0
    text = capsys.readouterr().out
    assert "\nlayout_1=" in text
    out = values(text)
    for key in ("flops_per_sample", "teacher_flops_per_sample", "flops_per_step", "gpu_hours",
                "best_layout", "memory_weights_gib", "memory_grads_gib", "memory_optimizer_gib",
                "memory_frozen_gib", "memory_activations_gib", "step_seconds",
                "time_to_train_days"):
        assert key in out, key
    assert out["stage"] == "mim" and out["world_size"] == "128"
    assert float(out["teacher_flops_per_sample"]) > 0 and float(out["memory_frozen_gib"]) > 0


def test_cli_paper_programme(capsys):
    tool = load_tool()
    assert tool.main(["--paper"]) == 0
    out = capsys.readouterr().out
    for stage in ("stage1_mim", "stage2_contrastive", "stage3_align", "sft_phase1", "sft_phase2"):
        assert f"{stage}: samples=" in out
    assert float(values(out)["total_gpu_hours"]) > 0


@pytest.mark.parametrize("args, message", [
    (["--config", "examples/stage1_mim.yaml", "--gpu", "v100"], "error: --gpu 'v100': choose one"),
    (["--config", "missing.yaml"], "error: --config missing.yaml: no such file"),
    (["--nodes"], "error: argument --nodes: expected one argument"),
])
def test_cli_user_errors(args, message):
    proc = subprocess.run([sys.executable, "tools/plan.py", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(message), lines


PAPER_CONFIGS = sorted(p.name for p in (REPO / "examples").glob("*.yaml")
                       if not p.stem.endswith("_tiny"))


def _sbatch_nodes(config_name: str) -> int:
    """--nodes of the slurm/*.sbatch that launches ``config_name`` (8 GPUs a node)."""
    import re

    for sbatch in sorted((REPO / "slurm").glob("*.sbatch")):
        text = sbatch.read_text()
        if f"examples/{config_name}" in text:
            return int(re.search(r"^#SBATCH --nodes=(\d+)$", text, re.M).group(1))
    raise AssertionError(f"no sbatch file launches examples/{config_name}")


@pytest.mark.parametrize("config", PAPER_CONFIGS)
def test_paper_configs_use_the_planners_first_layout(config, capsys):
    """Every paper-scale YAML runs the layout the planner ranks first on its sbatch's H100 nodes
    (README "Reproducing at scale")."""
    import yaml

    tool = load_tool()
    nodes = _sbatch_nodes(config)
    assert tool.main(["--config", f"examples/{config}", "--nodes", str(nodes),
                      "--gpus-per-node", "8", "--gpu", "h100"]) == 0
    out = values(capsys.readouterr().out)
    p = yaml.safe_load((REPO / "examples" / config).read_text())["parallel"]
    dp = nodes * 8 // (p["tensor_parallel"] * p["pipeline_parallel"] * p["context_parallel"])
    ours = (f"tp{p['tensor_parallel']}_pp{p['pipeline_parallel']}_cp{p['context_parallel']}"
            f"_dp{dp}")
    assert out["best_layout"] == ours, (config, out["best_layout"])


def test_step_loss_scope_adds_the_embedding_pass_to_the_step_time(capsys):
    """Stage II's ``loss_scope: step`` (the paper YAML's) embeds every micro-batch once more
    without autograd: the planner's step time counts that forward (about a third of a fwd+bwd,
    the ViT dominating), while the model FLOPs — and so MFU — do not. The CPU bench measures
    the same pass as ``siglip_step_overhead`` (README)."""
    tool = load_tool()
    runs = {}
    for scope in ("step", "micro_batch"):
        assert tool.main(["--config", "examples/stage2_contrastive.yaml", "--nodes", "16",
                          f"stage_config.loss_scope={scope}"]) == 0
        runs[scope] = values(capsys.readouterr().out)
    assert runs["step"]["model_flops"] == runs["micro_batch"]["model_flops"]
    assert float(runs["micro_batch"]["extra_forward_flops"]) == 0
    extra = float(runs["step"]["extra_forward_flops"]) / float(runs["step"]["model_flops"])
    assert 0.25 < extra < 0.45, extra  # a forward: about a third of a fwd+bwd
    assert runs["step"]["best_layout"] == runs["micro_batch"]["best_layout"]
    ratio = float(runs["step"]["step_seconds"]) / float(runs["micro_batch"]["step_seconds"])
    assert 1.25 < ratio < 1.45, ratio
