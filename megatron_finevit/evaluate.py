"""Standalone evaluation of a Stage I (MIM), Stage II (contrastive), Stage III (align) or SFT
checkpoint on an indexed shard directory:

    python -m megatron_finevit.evaluate --checkpoint runs/quickstart/stage2 \
        --data runs/quickstart/data/eval [--task retrieval|zero_shot|mim|align|vqa|all] [--json OUT]

The run config comes from the checkpoint (as saved by the trainer) or from ``--config`` — e.g. a
Stage II config with a Stage I checkpoint evaluates the model Stage II starts from (Stage I's
encoder, freshly initialised MAP head and text tower, same seed). Runs in one process (or under
torchrun at any data-parallel size: each rank embeds its share of the images). Stage II: prints
recall@1/5/10 image→text and text→image, zero-shot top-1/5 over the synthetic colour-shape classes
and chance. Stage I: the MIM loss per masked token and the prediction–target cosine on fixed masks.
Stage III: greedy answers to held-out region questions — grounding accuracy at IoU >= 0.5
(caption -> box), exact match and token F1 of region captions and OCR (box -> text) — each beside
a trivial baseline (the mean box; the most frequent answer). SFT (``--task vqa``): greedy short
answers to held-out VQA conversations (``tools/make_synthetic_vqa.py --split eval``), accuracy per
question kind beside the majority-answer baseline (``training.stages.sft_eval``).

The paper's benchmarks (Stage II checkpoints, one process; ``evaluation.benchmark_sets`` gives
each directory layout):

    python -m megatron_finevit.evaluate --checkpoint runs/stage2 --benchmark imagenet1k \
        --data /data/imagenet/val

``--benchmark`` is one of imagenet1k, imagenet_v2, imagenet_real (zero-shot top-1/5), coco,
flickr30k, dci, iiw, urban1k (recall@1/5/10 both ways); the training shards the checkpoint's
config names are not read, and unreadable images are skipped and counted.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from megatron_finevit.config.errors import ConfigError, UserError, report_user_error
from megatron_finevit.config.loader import config_from_data, load_config_collecting
from megatron_finevit.config.train import TrainConfig
from megatron_finevit.evaluation.benchmark_sets import BENCHMARKS
from megatron_finevit.logs import quiet_third_party_logs

TASK_KEYS = {"retrieval": ("i2t", "t2i", "chance_r1", "num_images"),
             "zero_shot": ("zero_shot",), "mim": ("mim_", "masked_tokens", "num_images"),
             "align": ("grounding_", "region_caption_", "ocr_", "eval_skipped"),
             "vqa": ("vqa_",)}
TASK_STAGES = {"retrieval": "contrastive", "zero_shot": "contrastive", "mim": "mim",
               "align": "align", "vqa": "sft"}
STAGE_TITLES = {"mim": "a Stage I (mim)", "contrastive": "a Stage II (contrastive)",
                "align": "a Stage III (align)", "sft": "an SFT (sft)"}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m megatron_finevit.evaluate",
                                     description="Evaluate a Stage I (MIM), Stage II "
                                     "(contrastive), Stage III (align) or SFT checkpoint on an "
                                     "indexed shard directory.")
    parser.add_argument("--checkpoint", required=True, help="checkpoint directory (with `latest`)")
    parser.add_argument("--data", required=True, help="indexed shard directory to evaluate on "
                        "(with --benchmark: the benchmark's directory)")
    parser.add_argument("--task", choices=(*TASK_KEYS, "all"), default="all",
                        help="retrieval / zero_shot: Stage II; mim: Stage I; align: Stage III; "
                             "vqa: SFT")
    parser.add_argument("--benchmark", choices=BENCHMARKS,
                        help="a paper benchmark instead of --task (Stage II checkpoints)")
    parser.add_argument("--config", help="run config YAML (default: the checkpoint's own)")
    parser.add_argument("--json", help="also write the metrics to this file")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    args = parser.parse_args(argv)
    if args.benchmark and args.task != "all":
        parser.error("give --task or --benchmark, not both")
    return args


def checkpoint_config(checkpoint_dir: str) -> dict:
    """The run config saved with the newest checkpoint in ``checkpoint_dir`` (checked whole)."""
    from megatron.core import dist_checkpointing

    from megatron_finevit.training.checkpoint_files import reading_checkpoint
    from megatron_finevit.training.checkpointing import latest_checkpoint

    path = latest_checkpoint(checkpoint_dir)
    with reading_checkpoint(path):
        return dist_checkpointing.load_common_state_dict(str(path))["common"]["config"]


def evaluation_config(args):
    """The run config to evaluate with, checked like a training run (``training.preflight``):
    raises ``UserError`` listing every problem of the arguments, the config and the files.
    Returns the config and its stage."""
    from megatron_finevit.training.checkpoint_files import CheckpointError
    from megatron_finevit.training.preflight import (
        InputPath,
        PreflightErrors,
        find_problems,
        input_path_problems,
        launch_world_size,
        published_checkpoint_problems,
    )

    _, checkpoint_problems = published_checkpoint_problems("--checkpoint", args.checkpoint)
    data = InputPath("--data", args.data, "directory" if args.benchmark else "shards")
    saved = None if checkpoint_problems else checkpoint_config(args.checkpoint)
    if args.config:
        cfg, problems = load_config_collecting(TrainConfig, args.config, args.overrides)
    elif saved is not None:
        cfg, problems = config_from_data(TrainConfig, saved, args.overrides)
    else:
        cfg, problems = None, []
    if cfg is None:  # no config to check the rest against: report what is known
        data_problems = input_path_problems(data)
        raise PreflightErrors([error for error in (
            (problems or data_problems) and ConfigError(problems + data_problems),
            checkpoint_problems and CheckpointError(checkpoint_problems)) if error])
    has_evaluation = args.task == "all" or TASK_STAGES[args.task] == cfg.stage
    if not has_evaluation:
        problems.append(f"--task {args.task} does not apply to a {cfg.stage} run: give "
                        f"{STAGE_TITLES[TASK_STAGES[args.task]]} checkpoint or --config")
    elif cfg.stage not in STAGE_TITLES:
        has_evaluation = False
        problems.append(f"stage {cfg.stage!r} has no evaluation here: give a Stage I (mim), "
                        "Stage II (contrastive), Stage III (align) or SFT (sft) checkpoint or "
                        "--config")
    elif args.benchmark and cfg.stage != "contrastive":
        problems.append(f"--benchmark needs a Stage II (contrastive) model, this is a {cfg.stage} "
                        "run: give a Stage II checkpoint or --config")
    if cfg.stage in ("align", "sft") and saved is not None and saved.get("stage") == cfg.stage:
        # a Stage III / SFT checkpoint sets every weight: the initial pieces are not read
        # (another stage's checkpoint, e.g. Stage II's, loads over them: the model the stage
        # starts from), nor are random initial weights asked for
        cfg.stage_config.pop("vit_init_dir", None)
        cfg.stage_config.pop("llm_init_dir", None)
        if cfg.stage == "sft":
            cfg.stage_config.pop("allow_random_init", None)
    # No training batch to size; TP, PP and CP are 1 below, so every launched rank is a
    # data-parallel rank (each evaluates its share) and the global batch must split over them.
    world_size = launch_world_size()
    cfg.train_steps, cfg.global_batch_size = 0, world_size
    cfg.samples_per_step, cfg.global_batch_schedule = 0, []
    cfg.optim.warmup_steps = 0
    cfg.parallel.tensor_parallel = cfg.parallel.pipeline_parallel = 1
    cfg.parallel.context_parallel, cfg.parallel.sequence_parallel = 1, False
    # evaluation saves nothing: a training run's save_interval must not ask for a checkpoint.dir
    cfg.checkpoint.dir, cfg.checkpoint.load_dir = None, args.checkpoint
    cfg.checkpoint.save_interval = 0
    cfg.checkpoint.save_on_signal = False
    cfg.eval.at_start = cfg.eval.at_end = False
    cfg.logging.tensorboard_dir, cfg.logging.progress_bar = None, False
    if args.benchmark:
        # the checkpoint sets every weight, and the benchmark brings its own images: neither the
        # text tower's initial weights nor the training shards are read
        cfg.stage_config.pop("text_init_dir", None)
        cfg.stage_config["eval_data_dir"] = None
        problems += input_path_problems(data)
        if world_size > 1:
            problems.append("--benchmark runs in one process: start it without torchrun / srun")
    elif has_evaluation:  # (a stage without this evaluation may not know the key)
        cfg.stage_config["eval_data_dir"] = args.data
    found = find_problems(cfg, world_size, problems)
    if args.benchmark:
        found.path_problems = [p for p in found.path_problems
                               if not p.startswith("stage_config.data.dir=")]
    error = found.error()
    if error is not None:
        raise error
    return cfg, found.stage


def select(results: dict[str, float], task: str) -> dict[str, float]:
    if task == "all":
        return results
    return {k: v for k, v in results.items() if k.startswith(TASK_KEYS[task])}


def format_table(results: dict[str, float]) -> str:
    lines = []
    if "mim_loss" in results:
        lines.append(f"MIM over {int(results['num_images'])} images "
                     f"({int(results['masked_tokens'])} masked patches): loss "
                     f"{results['mim_loss']:.4f} per masked patch, prediction-target cosine "
                     f"{results['mim_cosine']:.4f}")
    if "i2t_r1" in results:
        n = int(results["num_images"])
        lines.append(f"retrieval over {n} images / {n} captions (recall, %)")
        lines.append(f"{'':14s}{'R@1':>8s}{'R@5':>8s}{'R@10':>8s}")
        for name, key in (("image->text", "i2t"), ("text->image", "t2i")):
            lines.append(f"{name:14s}" + "".join(f"{100 * results[f'{key}_r{k}']:8.1f}"
                                                 for k in (1, 5, 10)))
        lines.append(f"{'chance':14s}" + "".join(f"{100 * min(1.0, k / n):8.1f}"
                                                 for k in (1, 5, 10)))
    if "zero_shot_top1" in results:
        lines.append(f"zero-shot colour+shape classes ({int(results['zero_shot_images'])} "
                     f"single-shape images): top-1 {100 * results['zero_shot_top1']:.1f}%, "
                     f"top-5 {100 * results['zero_shot_top5']:.1f}%, chance top-1 "
                     f"{100 * results['zero_shot_chance_top1']:.1f}%")
    if "grounding_acc" in results:
        lines.append(format_align_table(results))
    if "vqa_n" in results:
        lines.append(format_vqa_table(results))
    return "\n".join(lines)


def format_align_table(results: dict[str, float]) -> str:
    """Stage III: each metric beside its trivial baseline (percent)."""
    rows = [("grounding (caption -> box), acc@IoU0.5", "grounding_n", "grounding_acc",
             "grounding_baseline", "mean box")]
    for name, key in (("region caption (box -> text)", "region_caption"),
                      ("OCR (box -> text)", "ocr")):
        rows += [(f"{name}, exact match", f"{key}_n", f"{key}_em", f"{key}_baseline_em",
                  "most frequent"),
                 (f"{name}, token F1", f"{key}_n", f"{key}_f1", f"{key}_baseline_f1",
                  "most frequent")]
    lines = [f"{'Stage III held-out QA':42s}{'n':>6s}{'model':>9s}{'baseline':>10s}"]
    for label, n, value, baseline, what in rows:
        if value in results:
            lines.append(f"{label:42s}{int(results[n]):6d}{100 * results[value]:8.1f}%"
                         f"{100 * results[baseline]:9.1f}%  ({what})")
    return "\n".join(lines)


def format_vqa_table(results: dict[str, float]) -> str:
    """SFT: VQA accuracy per question kind beside the majority-answer baseline (percent)."""
    kinds = sorted(key[len("vqa_n_"):] for key in results if key.startswith("vqa_n_"))
    lines = [f"{'held-out VQA (exact match)':28s}{'n':>6s}{'model':>9s}{'baseline':>10s}"]
    for label, suffix in [*((kind, f"_{kind}") for kind in kinds), ("all", "")]:
        if f"vqa_acc{suffix}" in results:
            lines.append(f"{label:28s}{int(results[f'vqa_n{suffix}']):6d}"
                         f"{100 * results[f'vqa_acc{suffix}']:8.1f}%"
                         f"{100 * results[f'vqa_baseline{suffix}']:9.1f}%")
    lines.append(f"(baseline: the most frequent answer of each kind; "
                 f"{int(results.get('vqa_skipped', 0))} samples skipped)")
    return "\n".join(lines)


def run_paper_benchmark(cfg, stage, args) -> tuple[dict[str, float], str]:
    """``args.benchmark`` on the checkpoint's model: (metrics, the printed table)."""
    from megatron_finevit.evaluation.benchmark_model import (
        contrastive_encoders,
        load_contrastive_model,
    )
    from megatron_finevit.evaluation.benchmarks import format_benchmark, run_benchmark

    model, step = load_contrastive_model(cfg, stage, args.checkpoint)
    results = run_benchmark(args.benchmark, args.data, contrastive_encoders(stage, model, step))
    return results, format_benchmark(args.benchmark, results)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    quiet_third_party_logs()
    try:
        cfg, stage = evaluation_config(args)
        import torch.distributed as dist

        if args.benchmark:
            results, table = run_paper_benchmark(cfg, stage, args)
        else:
            from megatron_finevit.training.trainer import Trainer

            results = select(Trainer(cfg).evaluate(), args.task)
            table = format_table(results)
    except UserError as exc:
        # every rank checked the same arguments and exits 2; only global rank 0 prints
        return report_user_error(exc)
    if dist.get_rank() == dist.get_world_size() - 1:
        print(table)
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
