"""glibc malloc with and without transparent huge pages, on Stage III's output-layer step, on CPU.

    python tools/bench_malloc.py [--tokens 130] [--hidden 128] [--vocab 151936] [--steps 10]
                                 [--reps 3]

Stage III and SFT project each answer token onto Qwen3's whole vocabulary: the logits, their
gradient and the tied embedding's gradient are tensors of tens to hundreds of MB, allocated and
freed every micro-batch. glibc's malloc serves any block over 32 MB with a fresh ``mmap`` and
returns it with ``munmap``, so every step touches those megabytes as new 4 KiB pages: a page
fault each (measured in the quick start's Stage III: ~115,000 a second per rank, a third of the
CPU time spent in the kernel). ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` (glibc >= 2.35) makes
malloc ask for transparent huge pages, 2 MiB a fault; ``examples/cpu_quickstart.sh`` sets it.

This runs the same fp32 step — logits of ``--tokens`` rows of width ``--hidden`` over
``--vocab`` rows, cross-entropy, backward into both — in child processes with and without the
tunable, alternating, ``--reps`` times each. Prints each setting's seconds per step (median) and
the share of its CPU time spent in the kernel, then ``malloc_hugetlb_speedup=`` (median of the
paired ratios) and ``malloc_hugetlb_result_abs_diff=`` (the largest difference, over the pairs,
of the last step's loss plus the absolute sum of the weight gradient: 0 — the allocator changes
no arithmetic). Where glibc ignores the tunable (older glibc, musl, THP ``never``), the ratio
is ~1.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

HUGETLB = "glibc.malloc.hugetlb=1"


def child(tokens: int, hidden: int, vocab: int, steps: int) -> dict:
    """Time ``steps`` output-layer steps in this process: wall s/step and kernel CPU share."""
    import torch

    torch.manual_seed(0)
    weight = (torch.randn(vocab, hidden) * 0.02).requires_grad_()
    hidden_states = torch.randn(tokens, hidden).requires_grad_()
    labels = torch.randint(0, vocab, (tokens,))

    def step() -> float:
        loss = torch.nn.functional.cross_entropy(hidden_states @ weight.t(), labels)
        loss.backward()
        checksum = float(loss) + float(weight.grad.double().abs().sum())
        weight.grad = hidden_states.grad = None  # freed, as the trainer's per-step buffers
        return checksum

    step()  # warm-up: first-touch of the weights, kernel selection
    usage, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for _ in range(steps):
        checksum = step()
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF)
    user, system = after.ru_utime - usage.ru_utime, after.ru_stime - usage.ru_stime
    return {"s_per_step": seconds / steps, "sys_share": system / max(user + system, 1e-9),
            "checksum": checksum}


def run_child(args, hugetlb: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    env.setdefault("OMP_NUM_THREADS", "1")
    if hugetlb:
        env["GLIBC_TUNABLES"] = HUGETLB
    proc = subprocess.run(
        [sys.executable, __file__, "--child", "--tokens", str(args.tokens), "--hidden",
         str(args.hidden), "--vocab", str(args.vocab), "--steps", str(args.steps)],
        env=env, capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=130,
                        help="answer tokens per micro-batch (default 130: a quick-start pack)")
    parser.add_argument("--hidden", type=int, default=128, help="LM width (default 128)")
    parser.add_argument("--vocab", type=int, default=151936,
                        help="output rows (default 151,936: Qwen3's padded vocabulary)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per child")
    parser.add_argument("--reps", type=int, default=3, help="child pairs (default 3)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.tokens, args.hidden, args.vocab, args.steps)))
        return
    results = {False: [], True: []}
    for _ in range(args.reps):
        for hugetlb in (False, True):
            results[hugetlb].append(run_child(args, hugetlb))
    print(f"output-layer step: {args.tokens} tokens x width {args.hidden} x {args.vocab:,} "
          f"rows, fp32, {args.steps} steps x {args.reps} reps per setting")
    for hugetlb, label in ((False, "default malloc"), (True, f"GLIBC_TUNABLES={HUGETLB}")):
        runs = results[hugetlb]
        print(f"{label:38s} {statistics.median(r['s_per_step'] for r in runs) * 1e3:8.1f} ms/step"
              f"   kernel {100 * statistics.median(r['sys_share'] for r in runs):5.1f}% of CPU")
    ratios = [d["s_per_step"] / h["s_per_step"] for d, h in zip(results[False], results[True])]
    print(f"malloc_hugetlb_speedup={statistics.median(ratios):.2f}")
    # the allocator must not change the arithmetic: loss + |weight gradient| of the last step
    differences = [abs(d["checksum"] - h["checksum"]) for d, h in zip(results[False], results[True])]
    print(f"malloc_hugetlb_result_abs_diff={max(differences):.3g}")


if __name__ == "__main__":
    main()
