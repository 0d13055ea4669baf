"""Training entry point, launched by torchrun or srun (one process per GPU, or per CPU rank):

    torchrun --nproc-per-node 8 -m megatron_finevit.train --config examples/stage1_mim.yaml \
        optim.lr=1e-3 checkpoint.dir=/ckpt/stage1

Overrides are ``key.sub=value`` pairs applied on top of the YAML file (values parsed as YAML).
Everything checkable from the config and the file system is checked first (``training.preflight``)
and every problem printed on one line, by global rank 0 only. ``--dry-run --world-size N`` checks
a run on N ranks without building anything and prints its batch arithmetic (``training.dry_run``).
Exit codes: 0 done, 2 bad config, 3 stopped on SIGTERM/SIGUSR1 (checkpoint saved if a step ran;
the requeue marker written, see training/preemption.py).
"""

from __future__ import annotations

import argparse
import logging
import sys

from megatron_finevit.logs import quiet_third_party_logs
from megatron_finevit.training.preemption import install_process_handler  # no torch: cheap


EXIT_STOPPED_BY_SIGNAL = 3


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m megatron_finevit.train",
                                     description="Train a FineViT stage with megatron-core.")
    parser.add_argument("--config", help="YAML run config (see examples/)")
    parser.add_argument("--dry-run", action="store_true",
                        help="validate the config, layout and batch for --world-size ranks and "
                             "print the batch arithmetic as key=value lines; build nothing")
    parser.add_argument("--world-size", type=int, default=None,
                        help="ranks for --dry-run (default: the launcher's world size)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    args = parser.parse_args(argv)
    if args.world_size is not None and (not args.dry_run or args.world_size < 1):
        parser.error("--world-size N (N >= 1) goes with --dry-run; a run takes the launcher's")
    return args


def main(argv=None) -> int:
    # first of all: from here on SIGTERM/SIGUSR1 are recorded, never fatal (training/preemption.py)
    handler = install_process_handler()
    from megatron_finevit.config.errors import UserError, launcher_rank, report_user_error

    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    quiet_third_party_logs()
    try:
        if args.dry_run:
            return dry_run(args)
        from megatron_finevit.training.preflight import launch_world_size

        cfg, found = checked_config(args, launch_world_size())
        error = found.error()
        if error is not None:
            raise error
        from megatron_finevit.training.trainer import build_trainer

        result = build_trainer(cfg).train()
    except UserError as exc:
        # every rank validated the same config and exits 2; only global rank 0 prints
        code = report_user_error(exc)
        if launcher_rank() != 0:
            let_rank_0_report(handler)
        return code
    # 3: stopped on SIGTERM/SIGUSR1 (slurm/launch.sh requeues on the trainer's marker)
    return EXIT_STOPPED_BY_SIGNAL if result["stopped_by_signal"] else 0


def let_rank_0_report(handler, grace_s: float = 15.0) -> None:
    """On a quiet rank, wait (at most ``grace_s``) for the launcher to stop us before exiting 2.

    torchrun and ``srun --kill-on-bad-exit`` stop every worker as soon as one fails: a quiet rank
    that finished validating first would get rank 0 killed before it printed the problems, and
    the user would see nothing. Rank 0 exits right after printing; the launcher's SIGTERM then
    ends this wait at once (the process handler records it)."""
    import time

    logging.disable(logging.CRITICAL)  # quiet ranks stay quiet, the handler's notice included
    deadline = time.monotonic() + grace_s
    while handler.received is None and time.monotonic() < deadline:
        time.sleep(0.05)


def checked_config(args, world_size: int):
    """``(cfg, preflight.Findings)`` for the command line's config on ``world_size`` ranks;
    raises ``ConfigError`` when the config file itself cannot be read."""
    from megatron_finevit.config.errors import ConfigError
    from megatron_finevit.config.loader import load_config_collecting  # imports torch (~1 s)
    from megatron_finevit.config.train import TrainConfig
    from megatron_finevit.training.preflight import find_problems

    cfg, problems = load_config_collecting(TrainConfig, args.config, args.overrides)
    if cfg is None:
        raise ConfigError(problems)
    return cfg, find_problems(cfg, world_size, problems)


def dry_run(args) -> int:
    """Validate for ``--world-size`` ranks and print the batch arithmetic (stdout, key=value).
    Inputs missing on this machine (a cluster's paths on a laptop) are warnings here."""
    from megatron_finevit.training.dry_run import dry_run_lines
    from megatron_finevit.training.preflight import launch_world_size

    world_size = args.world_size or launch_world_size()
    cfg, found = checked_config(args, world_size)
    error = found.error(with_paths=False)
    if error is not None:
        raise error
    for problem in found.path_problems + found.checkpoint_problems:
        print(f"warning: {problem} (a real run stops here)", file=sys.stderr)
    print("\n".join(dry_run_lines(cfg, found.stage, world_size)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
