"""The paper's whole programme at its sample counts (``tools/plan.py --paper``).

Stages I-III are the example configs (``examples/stage{1,2,3}_*.yaml``: their resolution policies,
mean tokens per sample and phase shares) scaled to the paper's samples seen (Table 3: 1.8B,
9.3B, 0.5B). SFT (App. "Training Recipe"): the 80M-sample set, assumed seen once in each phase
(the paper gives batch sizes and token caps, not the epochs), FineViT + projector + Qwen3-1.7B
all trained, one image a sample (``workload`` module), samples averaging half the token cap
(2,048 of 4,096 and 5,120 of 10,240 tokens) in packs of the cap.
"""

from __future__ import annotations

from megatron_finevit.planning.workload import PhaseSpec, Workload, vlm_workload

PAPER_SAMPLES = {"stage1_mim": 1.8e9, "stage2_contrastive": 9.3e9, "stage3_align": 0.5e9}
SFT_SAMPLES = 80e6
SFT_PHASES = {"sft_phase1": (1024, 4096), "sft_phase2": (512, 10240)}  # batch, max tokens


def sft_workload(name: str, vl, batch: int, max_tokens: int,
                 samples: float = SFT_SAMPLES) -> Workload:
    mean = max_tokens / 2
    per_pack = max_tokens / mean
    steps = samples / batch
    spec = PhaseSpec(samples=samples, micro_batches=samples / per_pack, pack_tokens=max_tokens,
                     mean_tokens=mean, details={"phase_steps": round(steps),
                                                "mean_llm_tokens_per_sample": mean})
    return vlm_workload(name, vl, [spec])


def paper_programme(example_dir: str = "examples") -> dict[str, Workload]:
    """``{stage name: Workload}`` in the order they run."""
    from megatron_finevit.config.loader import load_config
    from megatron_finevit.config.train import TrainConfig
    from megatron_finevit.config.vlm import finevit_vl_1p7b
    from megatron_finevit.planning.from_config import workload_from_config

    programme = {}
    for name, samples in PAPER_SAMPLES.items():
        cfg = load_config(TrainConfig, f"{example_dir}/{name}.yaml")
        programme[name] = workload_from_config(cfg).scaled_to(samples)
    for name, (batch, max_tokens) in SFT_PHASES.items():
        programme[name] = sft_workload(name, finevit_vl_1p7b(), batch, max_tokens)
    return programme


def gpu_hours(flops: float, peak_tflops: float, mfu: float) -> float:
    """GPU-hours to run ``flops`` at ``mfu`` of ``peak_tflops``."""
    return flops / (peak_tflops * 1e12 * mfu) / 3600
