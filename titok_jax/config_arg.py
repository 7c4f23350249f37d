"""Parsing of ``get_config`` argument strings such as ``"variant=L-32,stage=1,runlocal"``."""
from __future__ import annotations

from typing import Any

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
