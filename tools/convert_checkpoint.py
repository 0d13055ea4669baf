"""Convert checkpoints between Hugging Face and megatron (dist_checkpointing, torch_dist).

    # HF -> megatron, checked to split at TP 2 x PP 2 (the checkpoint loads at any TP / PP)
    python tools/convert_checkpoint.py hf-to-mcore --model qwen3 \\
        --hf-dir Qwen3-1.7B --mcore-dir ckpt/qwen3_1p7b --tp 2 --pp 2

    # megatron -> HF (checkpoint saved at any TP / PP), with the tokenizer files
    python tools/convert_checkpoint.py mcore-to-hf --model qwen3 \\
        --mcore-dir ckpt/qwen3_1p7b --hf-dir out/Qwen3-1.7B --tokenizer-dir Qwen3-1.7B

Outputs are written to a temporary directory beside the target and renamed into place only when
complete; a failure leaves nothing behind. Runs in one process on CPU or GPU hosts.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys

from megatron_finevit.convert.registry import CONVERTERS
from megatron_finevit.logs import quiet_third_party_logs


# Where each model's presets live, for --preset: (module, lookup function).
_PRESETS = {
    "qwen3": ("megatron_finevit.config.llm", "qwen3_preset"),
    "siglip2-text": ("megatron_finevit.config.text", "text_preset"),
    "finevit": ("megatron_finevit.config.vit", "vit_preset"),
    "finevit-vl": ("megatron_finevit.config.vlm", "vl_preset"),
}


def _config_override(args):
    """--preset / --config for megatron checkpoints that carry no model_config.json (e.g. a
    trainer's checkpoint). --config takes the JSON of the model config's ``to_dict()``."""
    from megatron_finevit.convert.registry import get_converter

    if args.preset and args.config:
        raise SystemExit("give at most one of --preset and --config")
    if args.preset:
        module_name, lookup = _PRESETS[args.model]
        return getattr(importlib.import_module(module_name), lookup)(args.preset)
    if args.config:
        with open(args.config) as f:
            return get_converter(args.model).config_class.from_dict(json.load(f))
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--model", required=True, choices=sorted(CONVERTERS),
                        help="which model's name mapping to convert with")
    common.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                        help="output dtype (default: the input's)")
    common.add_argument("--overwrite", action="store_true", help="replace an existing output")
    common.add_argument("--no-progress", action="store_true", help="no progress bar")

    to_mcore = sub.add_parser("hf-to-mcore", parents=[common],
                              help="HF directory -> megatron dist checkpoint")
    to_mcore.add_argument("--hf-dir", required=True,
                          help="input: HF directory (config.json + safetensors)")
    to_mcore.add_argument("--mcore-dir", required=True,
                          help="output: megatron checkpoint directory (+ model_config.json)")
    to_mcore.add_argument("--tp", type=int, default=1, help="tensor-parallel size to validate for")
    to_mcore.add_argument("--pp", type=int, default=1, help="pipeline-parallel size to validate for")

    to_hf = sub.add_parser("mcore-to-hf", parents=[common],
                           help="megatron dist checkpoint -> HF directory")
    to_hf.add_argument("--mcore-dir", required=True,
                       help="input: megatron checkpoint directory (e.g. a trainer's iter_N)")
    to_hf.add_argument("--hf-dir", required=True,
                       help="output: HF directory (config.json + safetensors)")
    to_hf.add_argument("--tokenizer-dir", help="copy tokenizer files from this directory")
    to_hf.add_argument("--preset", help="model preset, e.g. qwen3_8b or finevit_vl_8b (for "
                                        "checkpoints without model_config.json)")
    to_hf.add_argument("--config", help="model config JSON, as written in model_config.json's "
                                        '"config" (for checkpoints without model_config.json)')
    to_hf.add_argument("--max-shard-gb", type=float, default=4.0, help="safetensors shard size in GB (default 4)")
    to_hf.add_argument("--megatron-prefix", default="",
                       help='key prefix of the model inside the checkpoint, e.g. "encoder." for '
                            "the FineViT of a Stage I/II trainer checkpoint")

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    quiet_third_party_logs()
    from megatron_finevit.convert.pipeline import hf_to_megatron, megatron_to_hf, parse_dtype

    try:
        if args.command == "hf-to-mcore":
            summary = hf_to_megatron(args.model, args.hf_dir, args.mcore_dir, args.tp, args.pp,
                                     dtype=parse_dtype(args.dtype), overwrite=args.overwrite,
                                     progress=not args.no_progress)
        else:
            summary = megatron_to_hf(args.model, args.mcore_dir, args.hf_dir,
                                     config=_config_override(args), dtype=parse_dtype(args.dtype),
                                     tokenizer_dir=args.tokenizer_dir,
                                     max_shard_bytes=int(args.max_shard_gb * 2**30),
                                     megatron_prefix=args.megatron_prefix,
                                     overwrite=args.overwrite, progress=not args.no_progress)
    # ConversionError (a ValueError) names the tensor; other ValueErrors are bad presets/configs
    except (ValueError, FileNotFoundError, FileExistsError, NotImplementedError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":  # dist_checkpointing's save starts a multiprocessing manager
    sys.exit(main())
