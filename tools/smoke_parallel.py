"""Train a tiny Qwen3-like GPT for a few steps on the parallel stack (TP/SP/PP/DP) and print the
loss and throughput — a quick check that an installation (CPU + gloo, or GPU + NCCL) works.

    torchrun --nproc-per-node 2 tools/smoke_parallel.py --tp 2 --steps 30

The task is learnable (each token is a fixed function of the previous one), so the loss must fall
from ~ln(vocab) towards 0; the script exits non-zero if it does not.
"""

from __future__ import annotations

import argparse
import math
import time

import torch


def learnable_batches(num_tokens_per_sample: int, batch: int, vocab: int, generator):
    """Sequences where t[i+1] = (5 * t[i] + 3) mod vocab: [batch, seq] tokens and labels."""
    start = torch.randint(0, vocab, (batch, 1), generator=generator)
    seq = [start]
    for _ in range(num_tokens_per_sample):
        seq.append((seq[-1] * 5 + 3) % vocab)
    tokens = torch.cat(seq, dim=1)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--sequence-parallel", action="store_true")
    parser.add_argument("--distributed-optimizer", action="store_true")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--num-microbatches", type=int, default=4)
    parser.add_argument("--seq-length", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    args = parser.parse_args()

    from megatron.core import parallel_state

    from megatron_finevit.platform import ParallelConfig, init_distributed, init_parallel, set_seed
    from megatron_finevit.testing.gpt_parity import RunConfig, build_gpt, make_optimizer, train_step

    env = init_distributed()
    run = RunConfig(tp=args.tp, pp=args.pp, sequence_parallel=args.sequence_parallel,
                    distributed_optimizer=args.distributed_optimizer,
                    micro_batch_size=args.micro_batch_size, seq_length=args.seq_length)
    init_parallel(ParallelConfig(tensor_parallel=run.tp, pipeline_parallel=run.pp,
                                 sequence_parallel=run.sequence_parallel),
                  num_attention_heads=4, num_query_groups=2, num_layers=run.num_layers)
    set_seed(1234)
    model = build_gpt(run)
    optimizer = make_optimizer(model, run.distributed_optimizer, lr=args.lr)
    dp_size = parallel_state.get_data_parallel_world_size()
    dp_rank = parallel_state.get_data_parallel_rank()
    generator = torch.Generator().manual_seed(1000 + dp_rank)
    tokens_per_step = args.num_microbatches * args.micro_batch_size * args.seq_length * dp_size
    is_reporter = parallel_state.is_pipeline_last_stage() and dp_rank == 0 and \
        parallel_state.get_tensor_model_parallel_rank() == 0
    if env.rank == 0:
        print(f"smoke_parallel: world {env.world_size} = TP {run.tp} x PP {run.pp} x DP {dp_size}"
              f"{' + SP' if run.sequence_parallel else ''}"
              f"{' + distributed optimizer' if run.distributed_optimizer else ''}", flush=True)
    first = last = None
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        batches = [learnable_batches(args.seq_length, args.micro_batch_size, run.vocab_size, generator)
                   for _ in range(args.num_microbatches)]
        t0 = time.perf_counter()
        loss, grad_norm, _ = train_step(model, optimizer, iter(batches), args.num_microbatches,
                                        args.seq_length, args.micro_batch_size)
        dt = time.perf_counter() - t0
        if is_reporter:
            first = loss if first is None else first
            last = loss
            if step == 1 or step % 5 == 0 or step == args.steps:
                print(f"step {step:4d} | loss {loss:.4f} | grad norm {grad_norm:.3f} | "
                      f"{tokens_per_step / dt:,.0f} tokens/s | {dt * 1000:.0f} ms/step", flush=True)
    elapsed = time.perf_counter() - start
    ok = torch.tensor([1 if (not is_reporter or last < 0.5 * first) else 0])
    torch.distributed.all_reduce(ok, op=torch.distributed.ReduceOp.MIN)
    if is_reporter:
        print(f"smoke_parallel: loss {first:.3f} -> {last:.3f} (ln vocab = {math.log(run.vocab_size):.3f}) "
              f"in {args.steps} steps, {args.steps * tokens_per_step / elapsed:,.0f} tokens/s overall")
    parallel_state.destroy_model_parallel()
    torch.distributed.destroy_process_group()
    if ok.item() != 1:
        if env.rank == 0:
            print("smoke_parallel: FAILED — the loss did not halve", flush=True)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
