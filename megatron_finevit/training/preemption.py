"""SIGTERM / SIGUSR1 → every rank stops at the same step, saves, and exits with code 3 (Slurm
pre-emption and time limits).

The life of a signal:

- ``main()`` calls ``install_process_handler()`` first thing, before the heavy imports: from then on
  a signal is only recorded, never fatal, whether it lands during imports, distributed init, model
  or data build, checkpoint load, a step or the exit itself.
- The trainer asks ``should_stop()`` at its safe points: right before the first step (a signal
  during start-up) and after each step. It all-reduces the flag, so every rank stops together (a
  signal may reach only some ranks, or reach them at different steps).
- Once stopped (and saved, if a step ran), every rank calls ``confirm_stop()``: after a barrier
  rank 0 writes the requeue marker, and a final barrier keeps any rank from exiting before the
  marker exists. The launcher requeues on the marker, not on srun's exit status, which depends on
  which rank exits first (``slurm/launch.sh``).

Library use (tests, notebooks) without ``main()``: ``handler_for_run()`` installs a handler for one
``Trainer.train()`` and ``release()`` restores the previous ones when the run ends.
"""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
# The file the launcher watches (set by slurm/launch.sh): present = "every rank stopped on a
# signal with its checkpoint saved; requeue me".
REQUEUE_MARKER_ENV = "FINEVIT_REQUEUE_MARKER"


class PreemptionHandler:
    """Records SIGTERM / SIGUSR1 instead of dying; ``should_stop`` turns the record into a decision
    all ranks share."""

    def __init__(self, signals=SIGNALS, process_wide: bool = False):
        self.received: int | None = None
        self.process_wide = process_wide
        self._previous = {sig: signal.signal(sig, self._handle) for sig in signals}

    def _handle(self, signum, frame) -> None:
        self.received = signum
        log.warning("received %s: will save a checkpoint and exit at the next safe point",
                    signal.Signals(signum).name)

    def should_stop(self) -> bool:
        """Whether any rank has received a signal (a collective: call it on every rank)."""
        import torch
        import torch.distributed as dist

        from megatron_finevit.platform.distributed import collective_device

        flag = torch.tensor([1 if self.received is not None else 0], device=collective_device())
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def confirm_stop(self, message: str) -> None:
        """Every rank calls this after stopping on a signal (and saving): when all have, rank 0
        writes ``message`` to the requeue marker (``$FINEVIT_REQUEUE_MARKER``, if set); no rank
        returns before the marker exists. Consumes the signal, so a later run in this process
        starts clean."""
        import torch.distributed as dist

        from megatron_finevit.training.checkpointing import write_atomically

        self.received = None
        marker = os.environ.get(REQUEUE_MARKER_ENV)
        if dist.is_initialized():
            dist.barrier()  # every rank has stopped, and its part of the checkpoint is written
        if marker and (not dist.is_initialized() or dist.get_rank() == 0):
            write_atomically(Path(marker), message + "\n")
        if dist.is_initialized():
            dist.barrier()  # the marker exists before any rank exits

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def release(self) -> None:
        """End of a run: a run's own handler gives the signals back; the process-wide one stays,
        so a signal during the exit is still not fatal."""
        if not self.process_wide:
            self.restore()


_process_handler: PreemptionHandler | None = None


def install_process_handler() -> PreemptionHandler:
    """Record SIGTERM / SIGUSR1 for the rest of this process's life (idempotent). Call it at the
    very top of an entry point, before anything slow: a signal that arrives earlier is fatal."""
    global _process_handler
    if _process_handler is None:
        _process_handler = PreemptionHandler(process_wide=True)
    return _process_handler


def handler_for_run(enabled: bool) -> PreemptionHandler | None:
    """The handler a training run uses: the process-wide one if an entry point installed it, else
    one for this run only. ``enabled=False`` (``checkpoint.save_on_signal: false``) gives the
    signals back their previous action and returns None."""
    global _process_handler
    if not enabled:
        if _process_handler is not None:
            _process_handler.restore()
            _process_handler = None
        return None
    return _process_handler or PreemptionHandler()

