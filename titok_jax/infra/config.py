"""Parsing of ``get_config`` argument strings such as ``"variant=L-32,stage=1,runlocal"``."""
from __future__ import annotations

import ast
import importlib.util
import os
from typing import Any, Sequence

import ml_collections


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
    """Parses ``key=value`` pairs and bare flags (``runlocal`` -> True) against ``defaults``.

    Values are converted to the type of their default; an unknown key raises ValueError.
    """
    out = dict(defaults)
    for item in filter(None, (s.strip() for s in (arg or "").split(","))):
        key, sep, value = item.partition("=")
        key = key.strip()
        if key not in defaults:
            raise ValueError(f"unknown config argument {key!r} in {arg!r}; known: "
                             f"{sorted(defaults)}")
        default = defaults[key]
        if not sep:
            if not isinstance(default, bool):
                raise ValueError(f"config argument {key!r} needs a value ({key}=...)")
            out[key] = True
        elif isinstance(default, bool):
            if value.lower() not in ("true", "false", "1", "0"):
                raise ValueError(f"config argument {key!r} expects true/false, got {value!r}")
            out[key] = value.lower() in ("true", "1")
        elif isinstance(default, int):
            out[key] = int(value)
        else:
            out[key] = value
    return ml_collections.ConfigDict(out)


def load_config(spec: str) -> ml_collections.ConfigDict:
    """``path/to/config.py[:arg]`` -> ``get_config(arg)`` of that file."""
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file not found: {path}")
    module_spec = importlib.util.spec_from_file_location(
        "titok_jax_config_" + os.path.basename(path)[:-3], path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg or None)


def apply_overrides(config: ml_collections.ConfigDict, overrides: Sequence[str]) -> None:
    """Applies ``a.b.c=value`` overrides; values are Python literals (else strings) and are
    converted to the type of the current value. Unknown keys raise."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ValueError(f"override {item!r} must look like key=value")
        *parents, leaf = key.split(".")
        node = config
        for part in parents:
            if part not in node:
                raise ValueError(f"unknown config key {key!r}")
            node = node[part]
        if leaf not in node:
            raise ValueError(f"unknown config key {key!r}; known here: {sorted(node.keys())}")
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw
        current = node[leaf]
        if isinstance(current, bool) and isinstance(value, int):
            value = bool(value)
        elif isinstance(current, float) and isinstance(value, int):
            value = float(value)
        elif isinstance(current, str) and not isinstance(value, str):
            value = raw
        elif current is not None and not isinstance(value, type(current)):
            raise ValueError(f"config key {key!r} expects {type(current).__name__}, got {raw!r}")
        node[leaf] = value

