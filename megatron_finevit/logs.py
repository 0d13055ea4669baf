"""Keep the known, expected third-party noise out of our command-line output.

On these stacks megatron-core, torch and transformers print the same warnings on every run: no
Apex / TransformerEngine (expected on CPU and without TE), deprecations of APIs megatron itself
still calls, a progress bar for every small checkpoint transformers loads. They bury the run log
and teach users to ignore warnings. ``quiet_third_party_logs()`` (called first in every entry
point and tool) drops exactly those messages, each matched by its text and the module or logger
that emits it, so any other warning — ours or new — still shows.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import warnings

# (message regex, emitting-module regex) of ``warnings.warn`` calls we know and accept.
KNOWN_WARNINGS = (
    # megatron-core falls back to torch implementations without Apex / TransformerEngine
    (r".*Apex is not installed", r"megatron\."),
    (r".*Transformer Engine and Apex are not installed", r"megatron\."),
    # megatron-core's own deprecations and experimental notices (its defaults, not our calls)
    (r"full scope is deprecated", r"megatron\."),
    (r"MimoModelConfig is experimental", r"megatron\."),
    # the distributed optimizer's fp32 shards are views; megatron reads their .grad to zero it
    (r"The \.grad attribute of a Tensor that is not a leaf Tensor", r"megatron\.core\.optimizer"),
    # torch.distributed.checkpoint as megatron's dist_checkpointing calls it
    (r"Please use DTensor instead", r"torch\.distributed"),
    (r"The argument order of load has been changed", r"torch\.distributed"),
    (r"torch\.distributed is disabled", r"torch\.distributed"),
    (r".*is deprecated\. Please use `torch\.distributed", r""),
)

# logger name -> message regexes of log records we know and accept.
KNOWN_LOG_RECORDS = {
    # we build GPTModel on purpose: Megatron-LM's pretrain_gpt does, HybridStack hard-codes TE
    "megatron.core.models.gpt.gpt_model": (r"GPTModel IS DEPRECATED",),
    "megatron.core.distributed.distributed_data_parallel": (r".*full_param_layout not provided",),
    "megatron.core.dist_checkpointing.strategies.torch": (r".*async save is deprecated",),
    "DeepSpeed": (r"Setting accelerator to CPU",),
}


class _DropKnownRecords(logging.Filter):
    """A logger filter dropping the records whose message matches one of ``patterns``."""

    def __init__(self, patterns: tuple[str, ...]):
        super().__init__()
        self.patterns = [re.compile(p) for p in patterns]

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(p.match(message) for p in self.patterns)


_FILTERS = {name: _DropKnownRecords(patterns) for name, patterns in KNOWN_LOG_RECORDS.items()}


def quiet_third_party_logs() -> None:
    """Silence the known third-party warnings, log records and progress bars (idempotent)."""
    # megatron-core logs every parameter of every gradient bucket at INFO
    logging.getLogger("megatron").setLevel(logging.WARNING)
    for message, module in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, module=module)
    for name, record_filter in _FILTERS.items():
        logging.getLogger(name).addFilter(record_filter)  # a no-op when already added
    _hide_transformers_loading_bars()


def _hide_transformers_loading_bars() -> None:
    """transformers draws a "Loading weights" bar for every checkpoint it loads (the teacher, a
    converted model): gate it the way huggingface_hub does, also when already imported."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
