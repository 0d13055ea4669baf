"""Train a tiny Qwen3-like GPT for a few steps through the real training loop on the parallel
stack (TP / SP / PP / DP) and check that the loss falls — a quick check that an installation
(CPU + gloo, or GPU + NCCL) works.

    torchrun --nproc-per-node 2 tools/smoke_parallel.py --tp 2 --sequence-parallel --steps 30

The task is learnable (each token is a fixed function of the previous one), so the loss must fall
from ~ln(vocab) towards 0; the script exits non-zero unless it at least halves.
"""

from __future__ import annotations

import argparse
import logging

import torch.distributed as dist

from megatron_finevit.config.train import OptimSection, ParallelSection, TrainConfig
from megatron_finevit.logs import quiet_third_party_logs


def main() -> int:
    parser = argparse.ArgumentParser(description=(
        "Train a tiny Qwen3-like GPT through the real training loop at the given parallel "
        "layout (the rest of the world is data parallel); exit non-zero unless the loss halves."))
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    parser.add_argument("--pp", type=int, default=1, help="pipeline-parallel size")
    parser.add_argument("--sequence-parallel", action="store_true", help="with --tp > 1")
    parser.add_argument("--distributed-optimizer", action="store_true",
                        help="shard the optimizer state over the data-parallel ranks")
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps (default 30)")
    parser.add_argument("--global-batch-size", type=int, default=4, help="micro-batches per step")
    parser.add_argument("--micro-batch-size", type=int, default=4, help="sequences per micro-batch")
    parser.add_argument("--seq-length", type=int, default=64, help="tokens per sequence")
    parser.add_argument("--lr", type=float, default=3e-3, help="constant learning rate")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    quiet_third_party_logs()

    from megatron_finevit.training.trainer import Trainer

    cfg = TrainConfig(
        stage="toy_lm", train_steps=args.steps, global_batch_size=args.global_batch_size,
        parallel=ParallelSection(tensor_parallel=args.tp, pipeline_parallel=args.pp,
                                 sequence_parallel=args.sequence_parallel,
                                 distributed_optimizer=args.distributed_optimizer),
        optim=OptimSection(lr=args.lr, weight_decay=0.0, warmup_steps=0, decay_style="constant"),
        stage_config={"num_layers": 4, "seq_length": args.seq_length,
                      "micro_batch_size": args.micro_batch_size},
    )
    cfg.logging.log_interval = 5
    trainer = Trainer(cfg)
    if dist.get_rank() == 0:
        p = cfg.parallel
        print(f"smoke_parallel: world {dist.get_world_size()} = TP {p.tensor_parallel} x PP "
              f"{p.pipeline_parallel} x DP {trainer.dp_size}{' + SP' if p.sequence_parallel else ''}"
              f"{' + distributed optimizer' if p.distributed_optimizer else ''}", flush=True)
    losses = trainer.train()["losses"]
    ok = not trainer.is_logger or (len(losses) == args.steps and losses[-1] < 0.5 * losses[0])
    if trainer.is_logger:
        print(f"smoke_parallel: loss {losses[0]:.3f} -> {losses[-1]:.3f} in {len(losses)} steps: "
              f"{'OK' if ok else 'FAILED, the loss did not halve'}", flush=True)
    flags = [None] * dist.get_world_size()
    dist.all_gather_object(flags, ok)
    dist.destroy_process_group()
    return 0 if all(flags) else 1


if __name__ == "__main__":
    raise SystemExit(main())
