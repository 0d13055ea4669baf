"""Forward+backward throughput of FineViT against transformers' Qwen2.5-VL vision tower, on CPU.

    python tools/bench_vit.py --quick          # small model (width 384), < 1 minute on 2 cores
    python tools/bench_vit.py                  # the paper's layer shape (width 1536), 4 layers
    python tools/bench_vit.py --layers 28      # the whole 0.86B encoder (slow on a CPU)
    python tools/bench_vit.py --device cuda --layers 28   # one GPU, bf16, a 24-image pack

Both towers get the same depth, width, heads and SwiGLU FFN, the same 2×2 merge to the same
output width, and the same packed batch of mixed-resolution images (patches in the same
merge-window-major order, segments given by cu_seqlens). The Qwen2.5-VL tower is configured for
full attention in every block (``fullatt_block_indexes`` = all, temporal patch 1) and built from
its config (random weights, nothing downloaded). Remaining differences, all in its favour or
negligible: it has biases in qkv / MLP (we have none), no final norm before the merger.

The two are timed alternately, ``--reps`` times each after a warm-up; medians are reported.
Also printed: a pack of 16 images against a single image of the same size (ours; the ratio
should stay near 16: packing must not cost more than running the images one by one), and
``cpu_mfu`` (``cuda_mfu``): our achieved matmul FLOP/s over the machine's large-GEMM FLOP/s (fp32
2048³ on CPU, bf16 8192³ on a GPU) measured in the same run. On a GPU both towers run in bf16
(megatron's bf16 parameters; the HF tower cast with ``.to``), with CUDA synchronised around every
timed step. The last line is ``ratio_vs_hf=<ours / theirs tokens per second>``.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import time
import warnings

import torch
from tqdm import tqdm

QUICK_SIZES = [(224, 224), (168, 280), (112, 196)]  # 608 patches
FULL_SIZES = [(336, 336), (224, 392), (168, 224)]  # 1,216 patches
GPU_SIZES = FULL_SIZES * 8  # 9,728 patches: enough work to fill a GPU
SCALING_SIZE = (112, 112)  # the 16-vs-1 image: 64 patches
GEMM_SIZE = {"cpu": 2048, "cuda": 8192}


def _free_port() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])


class OurTower(torch.nn.Module):
    """FineViT encoder + merge projector: the same work as the Qwen2.5-VL tower's forward."""

    def __init__(self, vit, out_dim: int, dtype: torch.dtype = torch.float32):
        super().__init__()
        from megatron_finevit.models.heads import MergeProjector
        from megatron_finevit.models.vit import FineViTModel

        config = vit.to_transformer_config(params_dtype=dtype)
        self.encoder = FineViTModel(vit, config)
        self.projector = MergeProjector(config, out_dim)

    def forward(self, inp) -> torch.Tensor:
        tokens = inp.gather_output(self.encoder(**inp.model_inputs()))
        return self.projector(tokens, inp.cu_seqlens[:inp.grids.shape[0] + 1])


def build_hf_tower(vit, out_dim: int):
    from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
        Qwen2_5_VisionTransformerPretrainedModel,
    )

    config = Qwen2_5_VLVisionConfig(
        depth=vit.num_layers, hidden_size=vit.hidden_size, intermediate_size=vit.ffn_hidden_size,
        num_heads=vit.num_attention_heads, in_channels=vit.in_channels,
        patch_size=vit.patch_size, spatial_merge_size=vit.merge_size, temporal_patch_size=1,
        window_size=100_000, fullatt_block_indexes=list(range(vit.num_layers)),
        out_hidden_size=out_dim, hidden_act="silu")
    config._attn_implementation = "sdpa"
    return Qwen2_5_VisionTransformerPretrainedModel(config)


def forward_flops(vit, lengths: list[int], out_dim: int) -> float:
    """Matmul FLOPs of one forward pass (encoder + merge projector) over images of ``lengths``."""
    h, f, tokens = vit.hidden_size, vit.ffn_hidden_size, sum(lengths)
    per_layer = 2 * tokens * (4 * h * h + 3 * h * f) + 4 * h * sum(n * n for n in lengths)
    merge = 2 * (tokens // 4) * (16 * h * h + 4 * h * out_dim)
    return vit.num_layers * per_layer + 2 * tokens * vit.patch_dim * h + merge


def gemm_step(size: int, device: str, dtype: torch.dtype):
    """One large GEMM (``2·size³`` FLOPs): the machine's reference matmul throughput."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    return lambda: a @ b


def _timed(step) -> tuple[float, float]:
    """(wall-clock, process CPU) seconds of one call: on a shared machine the CPU time shows
    what the wall clock loses to other processes. CUDA work is waited for on both sides."""
    cuda = torch.cuda.is_initialized()
    if cuda:
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter(), time.process_time()
    step()
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - wall, time.process_time() - cpu


def _on(inp, device: str, dtype: torch.dtype):
    """The encoder input with its patch rows on ``device`` in ``dtype`` (the model moves the
    small index tensors itself)."""
    inp.patches = inp.patches.to(device, dtype)
    return inp


def _device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"CPU, {torch.get_num_threads()} threads"


def _fwd_bwd(model, run):
    def step():
        model.zero_grad(set_to_none=True)
        out = run()
        out.backward(torch.ones_like(out))
    return step


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small model and pack (< 1 min)")
    parser.add_argument("--preset", default=None, help="FineViT preset (default: finevit_0p86b, "
                        "small_vit with --quick)")
    parser.add_argument("--layers", type=int, default=4, help="depth of both towers (default 4: "
                        "every layer has the same shape, so the per-layer cost is what is compared)")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions per model (default 5)")
    parser.add_argument("--out-dim", type=int, default=None, help="merger output width")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cuda: one GPU, both towers in bf16")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=UserWarning)
    if args.threads:
        torch.set_num_threads(args.threads)

    from megatron_finevit.config.vit import vit_preset
    from megatron_finevit.models.vit import pack_images, prepare_encoder_input
    from megatron_finevit.platform import ParallelConfig, init_distributed, init_parallel, set_seed

    os.environ.setdefault("MASTER_PORT", _free_port())
    init_distributed()
    init_parallel(ParallelConfig())
    set_seed(0)
    vit = vit_preset(args.preset or ("small_vit" if args.quick else "finevit_0p86b"),
                     num_layers=args.layers)
    reps = args.reps or 5
    out_dim = args.out_dim or (512 if args.quick else 2048)
    sizes = QUICK_SIZES if args.quick else (GPU_SIZES if args.device == "cuda" else FULL_SIZES)
    device = args.device
    dtype = torch.bfloat16 if device == "cuda" else torch.float32

    g = torch.Generator().manual_seed(0)
    packed = pack_images([torch.randn(3, h, w, generator=g) for h, w in sizes])
    inp = _on(prepare_encoder_input(packed), device, dtype)
    patches = packed.patches.to(device, dtype)
    grid_thw = torch.tensor([[1, gh, gw] for gh, gw in packed.grids.tolist()], device=device)
    tokens = len(packed.patches)
    ours = OurTower(vit, out_dim, dtype).to(device)
    theirs = build_hf_tower(vit, out_dim).to(device, dtype)
    n_ours = sum(p.numel() for p in ours.parameters())
    n_theirs = sum(p.numel() for p in theirs.parameters())
    print(f"bench_vit: {vit.num_layers} layers, hidden {vit.hidden_size}, FFN "
          f"{vit.ffn_hidden_size}, {vit.num_attention_heads} heads; {len(sizes)} images, "
          f"{tokens} tokens per pack; {_device_name(device)}, {dtype}; params ours "
          f"{n_ours / 1e6:.1f}M, qwen2.5-vl tower {n_theirs / 1e6:.1f}M", flush=True)

    # the GEMM reference runs between the towers, so all three see the same machine load
    steps = {"ours": _fwd_bwd(ours, lambda: ours(inp)),
             "qwen2.5-vl": _fwd_bwd(theirs, lambda: theirs(patches, grid_thw).pooler_output),
             "gemm": gemm_step(GEMM_SIZE[device], device, dtype)}
    times, cpu_times = {name: [] for name in steps}, {name: [] for name in steps}
    for step in steps.values():
        step()  # warm-up
    for _ in tqdm(range(reps), desc="ours vs qwen2.5-vl (fwd+bwd), GEMM", file=sys.stderr):
        for name, step in steps.items():
            wall, cpu = _timed(step)
            times[name].append(wall)
            cpu_times[name].append(cpu)
    tps = {name: tokens / statistics.median(times[name]) for name in ("ours", "qwen2.5-vl")}
    for name in tps:
        print(f"{name:>11s}: median {statistics.median(times[name]) * 1e3:8.1f} ms per fwd+bwd, "
              f"{tps[name]:8.1f} tokens/s, best {min(times[name]) * 1e3:8.1f} ms, CPU time "
              f"{statistics.median(cpu_times[name]) * 1e3:8.1f} ms  (runs: "
              f"{', '.join(f'{t * 1e3:.0f}' for t in times[name])} ms)")

    # packing scales linearly: 16 images of one size vs that image alone (ours)
    side = SCALING_SIZE
    one = _on(prepare_encoder_input(pack_images([torch.randn(3, *side, generator=g)])),
              device, dtype)
    sixteen = _on(prepare_encoder_input(pack_images([torch.randn(3, *side, generator=g)
                                                     for _ in range(16)])), device, dtype)
    scale_steps = {"1": _fwd_bwd(ours, lambda: ours(one)), "16": _fwd_bwd(ours, lambda: ours(sixteen))}
    scale_times = {name: [] for name in scale_steps}
    for step in scale_steps.values():
        step()
    for _ in tqdm(range(reps), desc="16 images vs 1", file=sys.stderr):
        for name, step in scale_steps.items():
            scale_times[name].append(_timed(step)[0])
    t1, t16 = (statistics.median(scale_times[k]) for k in ("1", "16"))
    print(f"pack of 16 x {side[0]}x{side[1]} vs 1 image: {t16 * 1e3:.1f} ms vs {t1 * 1e3:.1f} ms "
          f"-> time_ratio_16_vs_1={t16 / t1:.2f}")

    achieved = 3 * forward_flops(vit, packed.image_lengths, out_dim) / statistics.median(times["ours"])
    size = GEMM_SIZE[device]
    peak = 2 * size ** 3 / statistics.median(times["gemm"])
    print(f"achieved {achieved / 1e9:.1f} GFLOP/s (fwd+bwd = 3x forward matmul FLOPs); "
          f"large-GEMM {peak / 1e9:.1f} GFLOP/s ({size}^3 {dtype} matmul, median of "
          f"{len(times['gemm'])} between the towers' runs)")
    print(f"{device}_mfu={achieved / peak:.3f}")
    if device == "cpu":
        cpu_ratio = statistics.median(cpu_times["qwen2.5-vl"]) / statistics.median(cpu_times["ours"])
        print(f"cpu_time_ratio_vs_hf={cpu_ratio:.3f} (theirs / ours process CPU seconds per step)")
    print(f"ratio_vs_hf={tps['ours'] / tps['qwen2.5-vl']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
