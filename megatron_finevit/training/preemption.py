"""SIGTERM / SIGUSR1 → save a checkpoint and exit cleanly (Slurm pre-emption and time limits).

The handler only records the signal; the loop asks ``should_stop()`` after each step, which
all-reduces the flag so every rank stops at the same step (a signal may reach only some ranks, or
reach them at different steps).
"""

from __future__ import annotations

import logging
import signal

import torch
import torch.distributed as dist

from megatron_finevit.platform.distributed import collective_device

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class PreemptionHandler:
    def __init__(self, signals=SIGNALS):
        self.received: int | None = None
        self._previous = {}
        for sig in signals:
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.received = signum
        log.warning("received %s: will save a checkpoint and exit after this step",
                    signal.Signals(signum).name)

    def should_stop(self) -> bool:
        flag = torch.tensor([1 if self.received is not None else 0], device=collective_device())
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
