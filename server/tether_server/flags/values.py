"""Argument types of the tether-server flags: durations, sizes, ``NAME=...`` pairs.

Each one takes the flag's text and returns its value, or raises
``argparse.ArgumentTypeError``, which argparse reports as ``argument --flag: <message>``.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

__all__ = ["comma_list", "duration", "name_and_path", "name_and_value", "size"]


def duration(text: str) -> float:
    """'500ms', '5s', '2m', '1h' or a bare number of seconds."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(ms|s|m|h)?\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (try 500ms, 5s, 2m)")
    value = float(match.group(1))
    return value * {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}[match.group(2)]


def size(text: str) -> int:
    """Bytes: '512MiB', '2G', '64k' or a bare number (units are powers of 1024)."""
    match = re.fullmatch(r"\s*([0-9]+)\s*([KMG]i?B?)?\s*", text, re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 512MiB)")
    unit = (match.group(2) or "").upper()[:1]
    return int(match.group(1)) * {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3}[unit]


_MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def name_and_path(text: str) -> tuple[str, str]:
    """``NAME=PATH`` of --model; the path made absolute (engines may run elsewhere)."""
    name, sep, path = text.partition("=")
    if not sep or not _MODEL_NAME.fullmatch(name) or not path:
        raise argparse.ArgumentTypeError(
            f"{text!r}: use NAME=PATH (NAME: letters, digits, '.', '_', '-')"
        )
    return name, str(Path(path).expanduser().resolve())


def name_and_value(text: str) -> tuple[str, str]:
    """``NAME=VALUE`` of an environment variable (--remote-env)."""
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return name, value


def comma_list(text: str) -> tuple[str, ...]:
    """``a,b,c``: the non-empty names, in order."""
    return tuple(name for name in text.split(",") if name)
