"""Atomic file writes: every file labelenc writes goes through here, so a crash leaves the old file or the new one
whole, never a torn one (checkpoints, weights, pointers, summaries, reports, converted annotations), Ctrl-C
included."""

from __future__ import annotations

import json
import os
import signal
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO


@contextmanager
def _ctrl_c_deferred() -> Iterator[None]:
    """Hold a Ctrl-C (SIGINT) back until the block ends, then let it act as it would have.

    An interrupt raised inside a writer (torch.save's zip writer among them) can surface as that writer's own error
    instead of the interrupt. Off the main thread, where no handler can be set, or where SIGINT's handler was not
    set from Python (and so cannot be put back), the block runs as it is.
    """
    previous = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is not threading.main_thread() or previous is None:
        yield
        return
    held = []
    signal.signal(signal.SIGINT, lambda signum, frame: held.append(frame))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if held:
            if callable(previous):
                previous(signal.SIGINT, held[0])
            elif previous != signal.SIG_IGN:
                signal.raise_signal(signal.SIGINT)


def write_atomic(path: str | Path, write: Callable[[BinaryIO], None]) -> Path:
    """Write through ``write`` into a hidden temp file beside ``path``, fsync it, then rename it over ``path``; a
    Ctrl-C meanwhile acts once the file is in place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _ctrl_c_deferred():
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
