"""A model config chosen by preset name plus field overrides, as a stage config names it
(``vit: finevit_0p86b`` + ``vit_overrides: {spec_backend: te}``), with every problem reported:
an unknown preset, an unknown field (with the closest known one), a value of the wrong type."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict

from megatron_finevit.config.errors import unknown_choice
from megatron_finevit.config.loader import parse_config


def preset_config(presets: dict[str, Callable], name: str, overrides: dict, name_key: str,
                  overrides_key: str, problems: list[str]):
    """``presets[name]()`` with ``overrides`` applied, or None for an unknown preset.

    ``name_key`` / ``overrides_key`` are the dotted config keys the two came from (for the
    messages). Each problem is appended to ``problems``; the config returned then only serves
    further validation (a wrong override falls back to the field's default)."""
    if name not in presets:
        problems.append(f"{name_key}: {unknown_choice('preset', name, presets)}")
        return None
    base = presets[name]()
    # Type-checked like any config section: the preset's values plus the overrides.
    return parse_config(type(base), {**asdict(base), **overrides}, overrides_key + ".", problems)
