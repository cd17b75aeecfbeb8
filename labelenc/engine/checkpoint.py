"""Checkpoint files: written atomically by the main process, read back with ``weights_only=True``."""

from __future__ import annotations

import os
import pickle
import tempfile
from pathlib import Path
from collections.abc import Callable
from typing import Any, BinaryIO

import torch

from labelenc import __version__
from labelenc.errors import UserError

FORMAT_VERSION = 1


class CheckpointError(UserError, RuntimeError):
    """A checkpoint or weights file that cannot be used; the message names the file."""


def _atomic_write(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Write through ``write`` into a temp file beside ``path``, fsync it, then rename it over ``path``."""
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


def save_file(payload: dict[str, Any], path: str | Path) -> None:
    """Write ``payload`` (tensors and plain data) to ``path`` atomically, stamped with the format version."""
    payload = {**payload, "format_version": FORMAT_VERSION, "labelenc_version": __version__}
    _atomic_write(Path(path), lambda f: torch.save(payload, f))


def write_text_atomic(path: str | Path, text: str) -> None:
    """Replace a small text file (pointer, JSON summary) so that a crash leaves the old or the new one whole."""
    _atomic_write(Path(path), lambda f: f.write(text.encode()))


def load_file(path: str | Path, kind: str = "checkpoint") -> dict[str, Any]:
    """Read a file written by :func:`save_file`; refuses anything but tensors and plain data."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{kind} file not found: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(
            f"refusing to load {kind} {path}: it holds Python objects other than tensors and plain data, "
            "or is corrupt; labelenc never executes code from a file"
        ) from None
    except Exception as err:  # truncated archives, empty files, foreign formats
        raise CheckpointError(f"cannot load {kind} {path}: truncated or not a torch file ({type(err).__name__})") from None
    if not isinstance(payload, dict) or "format_version" not in payload:
        raise CheckpointError(f"{path} is not a labelenc {kind} (no format_version)")
    if payload["format_version"] != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has {kind} format version {payload['format_version']}; this labelenc reads version {FORMAT_VERSION}"
        )
    return payload


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The checkpoint named in ``output_dir/last_checkpoint``, else the newest ``checkpoint_*.pth``, else None."""
    output_dir = Path(output_dir)
    pointer = output_dir / "last_checkpoint"
    if pointer.is_file() and pointer.read_text().strip():
        path = output_dir / pointer.read_text().strip()
        if path.is_file():
            return path
    found = sorted(output_dir.glob("checkpoint_*.pth"))
    return found[-1] if found else None
