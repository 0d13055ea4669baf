"""Plan a run: FLOPs, memory per GPU, step time, time to train and the best parallel layouts.

    python tools/plan.py --config examples/stage3_align.yaml --nodes 16 --gpus-per-node 8 --gpu h100
    python tools/plan.py --paper            # the paper's whole programme on H100 at 40% MFU
    python tools/plan.py --self-check       # the model against counted FLOPs and saved bytes

Output is ``name=value`` lines. The models behind it: ``planning.flops`` (the trainer's MFU
count), ``planning.memory``, ``planning.layouts`` (step-time model) and ``planning.programme``.
User errors (an unknown GPU, a missing config) print one line and exit 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TOP_LAYOUTS = 5


class UserError(Exception):
    """A problem with the command line or the config: one line, exit 2."""


class Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse prints usage + message; we keep one line
        raise UserError(message)


def parse(argv):
    parser = Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="a run config (examples/stageN.yaml)")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--gpu", default="h100", help="h100, h200 or a100")
    parser.add_argument("--mfu", type=float, default=0.4)
    parser.add_argument("--paper", action="store_true")
    parser.add_argument("--self-check", action="store_true")
    parser.add_argument("overrides", nargs="*", help="key.sub=value config overrides")
    args = parser.parse_args(argv)
    from megatron_finevit.planning.layouts import GPUS

    if args.gpu not in GPUS:
        raise UserError(f"--gpu {args.gpu!r}: choose one of {', '.join(GPUS)}")
    if not 0 < args.mfu <= 1:
        raise UserError(f"--mfu={args.mfu} must be in (0, 1]")
    if args.nodes < 1 or args.gpus_per_node < 1:
        raise UserError("--nodes and --gpus-per-node must be >= 1")
    if not (args.config or args.paper or args.self_check):
        raise UserError("give --config FILE, --paper or --self-check")
    if args.config and not Path(args.config).is_file():
        raise UserError(f"--config {args.config}: no such file")
    return args


def fmt(value: float) -> str:
    return f"{value:.4g}"


def plan_lines(workload, gpu, nodes: int, gpus_per_node: int, mfu: float) -> list[str]:
    from megatron_finevit.planning.layouts import GIB, rank_layouts
    from megatron_finevit.planning.programme import gpu_hours

    world = nodes * gpus_per_node
    steps = sum(p.details.get("phase_steps", 0) for p in workload.phases)
    lines = [f"stage={workload.stage}", f"world_size={world}", f"gpu={gpu.name}", f"mfu={mfu}",
             f"samples={fmt(workload.samples)}", f"train_steps={steps}",
             f"trained_params={fmt(workload.trained_params)}",
             f"frozen_params={fmt(workload.frozen_params)}"]
    for number, phase in enumerate(workload.phases):
        lines += [f"phase={number}"] + [f"{k}={v}" for k, v in phase.details.items()]
        lines += [f"samples_per_step={fmt(phase.samples / max(phase.details.get('phase_steps', 1), 1))}",
                  f"flops_per_sample={fmt(phase.flops_per_sample)}",
                  f"teacher_flops_per_sample={fmt(phase.teacher_flops_per_sample)}"]
    total = workload.work_flops
    lines += [f"flops_per_step={fmt(total / max(steps, 1))}", f"model_flops={fmt(workload.flops)}",
              f"teacher_flops={fmt(workload.teacher_flops)}",
              f"extra_forward_flops={fmt(workload.extra_forward_flops)}",
              f"gpu_hours={fmt(gpu_hours(total, gpu.peak_tflops, mfu))}"]
    ranked = rank_layouts(workload, world, gpu, gpus_per_node, mfu)
    if not ranked:
        return lines + ["layouts_that_fit=0"]
    best = ranked[0]
    lines += [f"layouts_that_fit={len(ranked)}", f"best_layout={best.layout.label}"]
    lines += [f"memory_{k}_gib={v / GIB:.2f}" for k, v in best.memory.items()]
    lines += [f"memory_total_gib={best.memory_total / GIB:.2f}",
              f"step_seconds={best.step_seconds:.3f}",
              f"time_to_train_days={best.step_seconds * steps / 86400:.2f}"]
    for rank, e in enumerate(ranked[:TOP_LAYOUTS], 1):
        lines.append(f"layout_{rank}={e.layout.label} samples_per_s={e.samples_per_second:.0f} "
                     f"step_s={e.step_seconds:.3f} memory_gib={e.memory_total / GIB:.1f}")
    return lines


def paper_lines(mfu: float, gpu) -> list[str]:
    from megatron_finevit.planning.programme import gpu_hours, paper_programme

    lines, total = [f"gpu={gpu.name}", f"mfu={mfu}"], 0.0
    for name, workload in paper_programme(str(REPO / "examples")).items():
        flops = workload.work_flops
        total += flops
        lines.append(f"{name}: samples={fmt(workload.samples)} model_flops={fmt(workload.flops)} "
                     f"teacher_flops={fmt(workload.teacher_flops)} "
                     f"extra_forward_flops={fmt(workload.extra_forward_flops)} "
                     f"gpu_hours={fmt(gpu_hours(flops, gpu.peak_tflops, mfu))}")
    return lines + [f"total_flops={fmt(total)}",
                    f"total_gpu_hours={fmt(gpu_hours(total, gpu.peak_tflops, mfu))}"]


def selfcheck_lines() -> list[str]:
    from megatron_finevit.planning.selfcheck import relative_error, run_selfcheck

    result = run_selfcheck()
    lines = [f"flops_{name}_planned={fmt(p)} counted={c}" for name, (p, c) in result["flops"].items()]
    lines += [f"activation_{name}_planned={fmt(p)} measured={m}"
              for name, (p, m) in result["activations"].items()]
    return lines + [f"planner_flops_rel_err={relative_error(result['flops']):.3g}",
                    f"planner_activation_rel_err={relative_error(result['activations']):.3g}"]


def main(argv=None) -> int:
    try:
        args = parse(argv)
        from megatron_finevit.planning.layouts import GPUS

        gpu = GPUS[args.gpu]
        lines = []
        if args.config:
            from megatron_finevit.config.loader import ConfigError, load_config
            from megatron_finevit.config.train import TrainConfig
            from megatron_finevit.planning.from_config import workload_from_config

            try:
                cfg = load_config(TrainConfig, args.config, args.overrides)
                workload = workload_from_config(cfg)
            except (ConfigError, ValueError) as exc:
                raise UserError(f"config error: {args.config}: {exc}".replace("\n", "; "))
            lines += plan_lines(workload, gpu, args.nodes, args.gpus_per_node, args.mfu)
        if args.paper:
            lines += paper_lines(args.mfu, gpu)
        if args.self_check:
            lines += selfcheck_lines()
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
