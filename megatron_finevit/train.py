"""Training entry point, launched by torchrun or srun (one process per GPU, or per CPU rank):

    torchrun --nproc-per-node 8 -m megatron_finevit.train --config examples/stage1_mim.yaml \
        optim.lr=1e-3 checkpoint.dir=/ckpt/stage1

Overrides are ``key.sub=value`` pairs applied on top of the YAML file (values parsed as YAML).
Exit codes: 0 done, 2 bad config, 3 stopped on SIGTERM/SIGUSR1 (checkpoint saved if a step ran;
the requeue marker written, see training/preemption.py).
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings

from megatron_finevit.training.preemption import install_process_handler  # no torch: cheap


EXIT_STOPPED_BY_SIGNAL = 3


def quiet_third_party_logs() -> None:
    """megatron-core logs every parameter of every bucket at INFO, and warns at import about the
    missing Apex/TransformerEngine fused kernels (expected on CPU): keep the run log readable."""
    logging.getLogger("megatron").setLevel(logging.WARNING)
    for message in (".*Apex is not installed.*", ".*Transformer Engine and Apex are not installed.*",
                    ".*Please use DTensor instead.*", ".*argument order of load has been changed.*",
                    ".*torch.distributed is disabled.*",
                    ".*is deprecated. Please use `torch.distributed.*"):
        warnings.filterwarnings("ignore", message=message)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m megatron_finevit.train",
                                     description="Train a FineViT stage with megatron-core.")
    parser.add_argument("--config", help="YAML run config (see examples/)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    # first of all: from here on SIGTERM/SIGUSR1 are recorded, never fatal (training/preemption.py)
    install_process_handler()
    from megatron_finevit.config.loader import ConfigError, load_config  # imports torch (~1 s)
    from megatron_finevit.config.train import TrainConfig

    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    quiet_third_party_logs()
    try:
        cfg = load_config(TrainConfig, args.config, args.overrides)
        cfg.validate()
    except (ConfigError, ValueError, FileNotFoundError) as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    from megatron_finevit.training.trainer import build_trainer

    result = build_trainer(cfg).train()
    # 3: stopped on SIGTERM/SIGUSR1 (slurm/launch.sh requeues on the trainer's marker)
    return EXIT_STOPPED_BY_SIGNAL if result["stopped_by_signal"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
