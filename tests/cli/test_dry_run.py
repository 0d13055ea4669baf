"""``--dry-run --world-size N``: every example config starts at the world size of the sbatch file
that launches it (nodes x tasks per node from its #SBATCH lines; tiny configs at 2), and the
printed batch arithmetic equals the one recomputed here from the YAML (or, with a shard
directory, from a per-sample loop over its index)."""

import re

import pytest
import yaml

from conftest import REPO, error_lines, run_cli

DRY_RUN = ("-m", "megatron_finevit.train", "--dry-run")
EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))


def sbatch_world_size(config_name: str) -> int | None:
    """nodes x ntasks-per-node of the slurm/*.sbatch that launches ``config_name``, or None."""
    for sbatch in sorted((REPO / "slurm").glob("*.sbatch")):
        text = sbatch.read_text()
        if f"examples/{config_name}" in text:
            value = {k: int(v) for k, v in re.findall(r"^#SBATCH --([a-z-]+)=(\d+)$", text, re.M)}
            return value["nodes"] * value["ntasks-per-node"]
    return None


def report(proc) -> list[tuple[str, str]]:
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return [tuple(line.split("=", 1)) for line in proc.stdout.splitlines()]


def phase_values(pairs, key) -> list[str]:
    return [v for k, v in pairs if k == key]


def expected_phases(raw: dict) -> list[tuple[int, int]]:
    """(start step, resolution phase number) of every phase a run reaches: the resolution and
    text-context schedules' steps below train_steps."""
    stage, steps = raw["stage_config"], raw["train_steps"]
    resolution = [0] + [s for s, _ in stage["data"].get("max_pixels_schedule", [])]
    starts = sorted({0, *resolution[1:], *(s for s, _ in stage.get("context_schedule", []))})
    return [(s, max(i for i, r in enumerate(resolution) if r <= s)) for s in starts if s < steps]


def pack_budget(raw: dict) -> tuple[int, float, list[float]]:
    """(tokens per pack, fill, mean tokens per sample of each resolution phase) a config states:
    FineViT packs count ViT tokens; Stage III and SFT packs count LLM tokens (image placeholders
    + text, one resolution phase)."""
    from megatron_finevit.training.stages.align import AlignDataSection
    from megatron_finevit.training.stages.sft import SFTDataSection
    from megatron_finevit.training.stages.vision import DataSection

    data = raw["stage_config"]["data"]
    if raw["stage"] in ("align", "sft"):
        section = AlignDataSection if raw["stage"] == "align" else SFTDataSection
        return (data["llm_tokens"], data.get("min_fill", section().min_fill),
                [data["mean_llm_tokens_per_sample"]])
    return (data["pack_tokens"], data.get("min_fill", DataSection().min_fill),
            data["mean_tokens_per_sample"])


@pytest.mark.parametrize("config", EXAMPLES, ids=lambda p: p.stem)
def test_example_config_starts_at_its_world_size(config, tmp_path):
    world = sbatch_world_size(config.name)
    assert (world is None) == config.stem.endswith("_tiny")  # paper configs have an sbatch
    world = world or 2
    # data.dir absent here: the estimate comes from the config's stated mean tokens per sample
    proc = run_cli(*DRY_RUN, "--config", str(config.relative_to(REPO)), "--world-size",
                   str(world), f"stage_config.data.dir={tmp_path}/absent")
    pairs = report(proc)
    values = dict(pairs)
    raw = yaml.safe_load(config.read_text())
    pack_tokens, fill, means = pack_budget(raw)
    p = raw["parallel"]
    dp = world // (p["tensor_parallel"] * p["pipeline_parallel"] * p["context_parallel"])
    phases = expected_phases(raw)
    per_pack = [pack_tokens * fill / means[r] for _, r in phases]
    # packs per step: global_batch_size, or with samples_per_step the multiple of DP nearest to
    # samples_per_step / samples per pack in each phase
    wanted = raw.get("samples_per_step", 0)
    packs = [max(1, round(wanted / n / dp)) * dp if wanted else raw["global_batch_size"]
             for n in per_pack]
    assert int(values["world_size"]) == world and int(values["data_parallel"]) == dp
    assert int(values["micro_batches_per_rank"]) * dp == packs[0]
    assert int(values["tokens_per_step"]) == packs[0] * pack_tokens
    starts = [start for start, _ in phases]
    assert [int(v) for v in phase_values(pairs, "phase_start_step")] == starts
    assert [int(v) for v in phase_values(pairs, "phase_micro_batches")] == packs
    assert set(phase_values(pairs, "samples_estimate")) == {"config"}
    samples = [round(k * n) for k, n in zip(packs, per_pack)]
    assert [int(v) for v in phase_values(pairs, "samples_per_step")] == samples
    lengths = [b - a for a, b in zip(starts, starts[1:] + [raw["train_steps"]])]
    assert int(values["total_samples"]) == sum(n * k for n, k in zip(samples, lengths))
    assert pairs[-1][0] == "total_samples"
    # every missing input is a warning, never an error, in a dry run
    assert all(line.startswith("warning: ") for line in error_lines(proc.stderr))


def test_estimate_from_the_index(tmp_path):
    """With an indexed data.dir the mean tokens per image of each resolution phase come from the
    index (oracle: a loop over its samples under each phase's resize policy)."""
    from megatron_finevit.data.index import build_index, load_index
    from megatron_finevit.data.resize import ResizePolicy
    from megatron_finevit.data.synthetic import make_synthetic_shards

    shards = tmp_path / "shards"
    make_synthetic_shards(shards, 48, seed=3, samples_per_shard=24, progress=False)
    build_index(shards, progress=False)
    config = REPO / "examples/stage2_contrastive_tiny.yaml"
    pairs = report(run_cli(*DRY_RUN, "--config", str(config.relative_to(REPO)), "--world-size",
                           "2", f"stage_config.data.dir={shards}"))
    data = yaml.safe_load(config.read_text())["stage_config"]["data"]
    index = load_index(shards)
    means = []
    for max_pixels in [data["max_pixels"]] + [m for _, m in data["max_pixels_schedule"]]:
        policy = ResizePolicy(max_pixels=max_pixels)
        tokens = [policy.num_patches(int(h), int(w)) for h, w in zip(index.height, index.width)]
        means.append(round(sum(tokens) / len(tokens), 1))
    assert set(phase_values(pairs, "samples_estimate")) == {"index, packed"}
    assert [float(v) for v in phase_values(pairs, "mean_tokens_per_sample")] == means
    assert means[1] > means[0]  # the 336² -> 448² analogue raises tokens per image


def test_dry_run_refuses_an_indivisible_batch():
    """The paper's Stage I batch before this fix (320 packs) on its sbatch's 128 ranks at its
    layout then (DP 128), given in packs (samples_per_step=0; in samples the counts are made
    multiples of DP)."""
    proc = run_cli(*DRY_RUN, "--config", "examples/stage1_mim.yaml", "--world-size", "128",
                   "global_batch_size=320", "samples_per_step=0", "parallel.pipeline_parallel=1")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and proc.stdout == ""
    assert error_lines(proc.stderr) == [
        "config error: global_batch_size=320 micro-batches do not split evenly over "
        "data_parallel=128 ranks: use a multiple of 128, e.g. 256 or 384"]
