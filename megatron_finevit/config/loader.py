"""YAML files and ``key.sub=value`` overrides into nested dataclasses, with clear errors.

    cfg = load_config(TrainConfig, "examples/stage1_mim_tiny.yaml", ["optim.lr=3e-4", "train_steps=50"])

Unknown keys (with the closest known one), wrong types and malformed overrides are reported with
their dotted path before any compute starts — all of them at once: ``parse_config`` collects every
problem and keeps a default where a value was wrong, so validation can go on; ``from_dict`` and
``load_config`` raise ``ConfigError`` listing them. Values in overrides are parsed as YAML scalars
(``3e-4``, ``true``, ``null``, ``[1, 2]``), so they follow the same rules as the file.
"""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from megatron_finevit.config.errors import ConfigError, did_you_mean

__all__ = ["ConfigError", "config_from_data", "from_dict", "load_config", "load_config_collecting",
           "parse_config", "to_dict"]


def load_config(cls, path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()):
    """Build ``cls`` from a YAML file (optional) with dotted overrides applied on top; raise
    ``ConfigError`` listing every problem."""
    config, problems = load_config_collecting(cls, path, overrides)
    if problems:
        raise ConfigError(problems)
    return config


def load_config_collecting(cls, path: str | Path | None = None,
                           overrides: list[str] | tuple[str, ...] = ()) -> tuple[Any, list[str]]:
    """``(config, problems)``: the config with defaults wherever the file or an override was
    wrong, and one line per problem (empty: the config is exactly what was asked for). The config
    is None when the file itself is missing or not YAML (nothing further to check)."""
    raw, problems = _read_yaml(path)
    if problems:
        return None, problems
    return config_from_data(cls, raw, overrides)


def config_from_data(cls, raw: dict, overrides: list[str] | tuple[str, ...] = ()
                     ) -> tuple[Any, list[str]]:
    """``load_config_collecting`` for a config already in memory (e.g. one a checkpoint saved)."""
    raw, problems = copy.deepcopy(raw), []
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            problems.append(f"override {item!r} must look like key.sub=value")
            continue
        try:
            _set_dotted(raw, key.strip(), yaml.safe_load(value) if value.strip() else None)
        except (ConfigError, yaml.YAMLError) as exc:
            problems.append(f"override {item!r}: {exc}")
    return parse_config(cls, raw, "", problems), problems


def _read_yaml(path: str | Path | None) -> tuple[dict, list[str]]:
    if path is None:
        return {}, []
    path = Path(path)
    if not path.is_file():
        return {}, [f"config file {path} does not exist"]
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        return {}, [f"{path}: not valid YAML: {' '.join(str(exc).split())}"]
    if not isinstance(raw, dict):
        return {}, [f"{path}: the top level must be a mapping, got {type(raw).__name__}"]
    return raw, []


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    node = tree
    parts = dotted.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{part} is a value, not a section")
        node = child
    node[parts[-1]] = value


def from_dict(cls, data: dict, path: str = ""):
    """Instantiate dataclass ``cls`` from ``data``, recursing into dataclass-typed fields;
    raise ``ConfigError`` listing every problem."""
    problems: list[str] = []
    config = parse_config(cls, data, path, problems)
    if problems:
        raise ConfigError(problems)
    return config


def parse_config(cls, data, path: str, problems: list[str]):
    """``cls`` from ``data``, appending one line per problem to ``problems``; a field whose value
    is unknown or wrong keeps its default, so the caller can validate the rest."""
    if not isinstance(data, dict):
        problems.append(f"{path.rstrip('.') or cls.__name__}: expected a mapping, "
                        f"got {type(data).__name__}")
        data = {}
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for name, value in data.items():
        if name not in known:
            hint = did_you_mean(name, known) or f" (known: {', '.join(sorted(known))})"
            problems.append(f"{path}{name}: unknown key{hint}")
            continue
        try:
            kwargs[name] = _coerce(hints[name], value, f"{path}{name}", problems)
        except ConfigError as exc:
            problems.extend(exc.problems)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        problems.append(f"{path.rstrip('.') or cls.__name__}: {exc}")
        return cls()


def _coerce(hint, value, path: str, problems: list[str]):
    """``value`` as type ``hint``; raises ConfigError for a wrong value (nested dataclasses add
    their own problems and keep defaults instead)."""
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return parse_config(hint, value, path + ".", problems)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(option, value, path, problems)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{path}: {value!r} fits none of {hint}: {'; '.join(errors)}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        (item_hint, *_) = typing.get_args(hint) or (Any,)
        items = [_coerce(item_hint, v, f"{path}[{i}]", problems) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        return dict(value)
    if hint is Any:
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        # PyYAML (YAML 1.1) reads "3e-4" as a string; accept what float() accepts.
        try:
            return float(value)
        except ValueError:
            pass
    if hint in (int, float, str, bool):
        if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
            raise ConfigError(f"{path}: expected {hint.__name__}, got {value!r}")
        return value
    if typing.get_origin(hint) is typing.Literal:
        if value not in typing.get_args(hint):
            raise ConfigError(f"{path}: must be one of {typing.get_args(hint)}, got {value!r}")
        return value
    return value


def to_dict(config) -> dict:
    """A dataclass config as plain data (for logging and checkpoints)."""
    return dataclasses.asdict(config)
