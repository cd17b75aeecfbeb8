"""Atomic writes: a file is replaced whole or not at all, and a Ctrl-C during the write waits for it."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from labelenc.fileio import write_atomic


def test_a_ctrl_c_during_a_write_acts_once_the_file_is_whole(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.pth"
    path.write_bytes(b"old")

    def write(f) -> None:
        f.write(b"first half, ")
        signal.raise_signal(signal.SIGINT)  # Ctrl-C in the middle of the write (torch.save's, say)
        f.write(b"second half")

    # Python's own Ctrl-C handler: in the full suite an earlier test leaves another (the test then failed as with
    # SIGINT ignored)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            write_atomic(path, write)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, previous)
    assert path.read_bytes() == b"first half, second half"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pth"]  # no temp file left behind


def test_a_failed_write_leaves_the_old_file(tmp_path: Path) -> None:
    path = tmp_path / "run_summary.json"
    path.write_bytes(b"old")

    def write(f) -> None:
        f.write(b"partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomic(path, write)
    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run_summary.json"]
