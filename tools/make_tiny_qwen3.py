"""Write a small, randomly initialised Qwen3 checkpoint (transformers format) for CPU runs.

    python tools/make_tiny_qwen3.py OUT_DIR [--preset tiny_qwen3] [--layers 2 --hidden 64] [--seed 0]

Stage III initialises its language model from a Hugging Face Qwen3 directory (converted with
``tools/convert_checkpoint.py hf-to-mcore --model qwen3``). The public checkpoints cannot be
downloaded here, so the tiny runs and tests start from this random one: the real tokenizer's
vocabulary (151,669 ids) with a few narrow layers. At scale, convert e.g. Qwen/Qwen3-1.7B instead.
"""

import argparse
from dataclasses import replace
from pathlib import Path

import torch

from megatron_finevit.logs import quiet_third_party_logs


def make_tiny_qwen3(out_dir: str | Path, preset: str = "tiny_qwen3", seed: int = 0,
                    **changes) -> Path:
    """Save a random Qwen3ForCausalLM of ``preset`` (with ``changes`` to its Qwen3Config fields)
    to ``out_dir``; returns the directory."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from megatron_finevit.config.llm import qwen3_preset
    from megatron_finevit.convert.qwen3 import Qwen3Converter

    config = replace(qwen3_preset(preset), **changes)
    hf_config = Qwen3Converter().hf_config(config, torch.float32)
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(Qwen3Config(**{k: v for k, v in hf_config.items()
                                            if k not in ("architectures", "model_type")}))
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    return out_dir


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", help="directory for config.json + model.safetensors")
    parser.add_argument("--preset", default="tiny_qwen3", help="Qwen3 preset (default tiny_qwen3)")
    parser.add_argument("--layers", type=int, help="num_layers (default: the preset's)")
    parser.add_argument("--hidden", type=int, help="hidden_size (default: the preset's)")
    parser.add_argument("--seed", type=int, default=0, help="initialisation seed (default 0)")
    args = parser.parse_args(argv)
    quiet_third_party_logs()
    changes = {k: v for k, v in (("num_layers", args.layers), ("hidden_size", args.hidden))
               if v is not None}
    path = make_tiny_qwen3(args.out_dir, args.preset, args.seed, **changes)
    print(f"random Qwen3 ({args.preset}{', ' if changes else ''}"
          f"{', '.join(f'{k}={v}' for k, v in changes.items())}) written to {path}")


if __name__ == "__main__":
    main()
