"""Atomic file writes: every file labelenc writes goes through here, so a crash leaves the old file or the new one
whole, never a torn one (checkpoints, weights, pointers, summaries, reports, converted annotations)."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO


def write_atomic(path: str | Path, write: Callable[[BinaryIO], None]) -> Path:
    """Write through ``write`` into a hidden temp file beside ``path``, fsync it, then rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Replace a text file (pointer, report, YAML config) atomically."""
    return write_atomic(path, lambda f: f.write(text.encode()))


def write_json_atomic(path: str | Path, payload: Any, indent: int | None = 2) -> Path:
    """Replace a JSON file atomically (summaries, reports, converted annotations), newline-terminated."""
    return write_text_atomic(path, json.dumps(payload, indent=indent) + "\n")
