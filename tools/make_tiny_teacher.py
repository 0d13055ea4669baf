"""Write a tiny, randomly initialised DINOv3 ViT checkpoint (transformers format) for CPU runs.

    python tools/make_tiny_teacher.py OUT_DIR [--hidden 64 --layers 2 --seed 0]

Stage I distils a frozen DINOv3 teacher. The paper's teacher weights cannot be downloaded in an
offline environment, so the tiny runs and tests distil this random network instead: its features
are a fixed, non-trivial function of the image, so the MIM loss measures real regression, but
the student learns no DINOv3 semantics from it. At scale point ``stage_config.teacher_dir`` at a
local copy of a real checkpoint (e.g. facebook/dinov3-vitl16-pretrain-lvd1689m).
"""

import argparse
from pathlib import Path

import torch

from megatron_finevit.logs import quiet_third_party_logs


def make_tiny_teacher(out_dir: str | Path, hidden: int = 64, layers: int = 2, heads: int = 4,
                      seed: int = 0) -> Path:
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    torch.manual_seed(seed)
    config = DINOv3ViTConfig(patch_size=16, hidden_size=hidden, intermediate_size=2 * hidden,
                             num_hidden_layers=layers, num_attention_heads=heads,
                             num_register_tokens=4, image_size=224)
    model = DINOv3ViTModel(config).eval()
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    return out_dir


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", help="directory for config.json + model.safetensors")
    parser.add_argument("--hidden", type=int, default=64, help="width (default 64)")
    parser.add_argument("--layers", type=int, default=2, help="transformer layers (default 2)")
    parser.add_argument("--heads", type=int, default=4, help="attention heads (default 4)")
    parser.add_argument("--seed", type=int, default=0, help="initialisation seed (default 0)")
    args = parser.parse_args(argv)
    quiet_third_party_logs()
    path = make_tiny_teacher(args.out_dir, args.hidden, args.layers, args.heads, args.seed)
    print(f"tiny random DINOv3 teacher written to {path}")


if __name__ == "__main__":
    main()
