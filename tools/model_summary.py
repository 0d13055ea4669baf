"""Parameter count and per-layer shapes of a FineViT preset, built on the meta device (no memory).

    python tools/model_summary.py finevit_0p86b
    python tools/model_summary.py tiny_vit --all-layers

Prints one line per parameter tensor of the first transformer layer (all layers with
``--all-layers``) and of the embedding / final norm, then the total, which must equal the
closed-form count from the config (``FineViTConfig.num_parameters``).
"""

from __future__ import annotations

import argparse
import os
import socket
import sys

from megatron_finevit.logs import quiet_third_party_logs


def _free_port() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("preset", help="FineViT preset: finevit_0p86b, tiny_vit or small_vit")
    parser.add_argument("--all-layers", action="store_true", help="list every layer's tensors")
    args = parser.parse_args()
    quiet_third_party_logs()

    import torch

    from megatron_finevit.config.vit import vit_preset
    from megatron_finevit.platform import ParallelConfig, init_distributed, init_parallel

    vit = vit_preset(args.preset)
    os.environ.setdefault("MASTER_PORT", _free_port())
    init_distributed()
    init_parallel(ParallelConfig())
    from megatron_finevit.models.vit import FineViTModel

    with torch.device("meta"):
        model = FineViTModel(vit, vit.to_transformer_config(perform_initialization=False))
    total = 0
    print(f"{args.preset}: {vit.num_layers} layers, hidden {vit.hidden_size}, FFN "
          f"{vit.ffn_hidden_size} (SwiGLU), {vit.num_attention_heads} heads of {vit.head_dim}, "
          f"patch {vit.patch_size}, 2D RoPE, RMSNorm pre-norm, no class token")
    for name, param in model.named_parameters():
        total += param.numel()
        layer = name.split(".")[2] if name.startswith("decoder.layers.") else None
        if args.all_layers or layer in (None, "0"):
            print(f"  {name:55s} {str(list(param.shape)):>14s} {param.numel():>12,d}")
    if not args.all_layers and vit.num_layers > 1:
        print(f"  (decoder.layers.1 .. {vit.num_layers - 1}: same shapes as layer 0)")
    expected = vit.num_parameters()
    print(f"total parameters: {total:,d} ({total / 1e9:.4f}B); closed form {expected:,d}")
    if total != expected:
        print("error: the built model and the closed-form count disagree", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
