"""Tests for checkpoint files (labelenc/engine/checkpoint.py): atomic writes, weights_only reads, clear refusals."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from labelenc.engine.checkpoint import FORMAT_VERSION, CheckpointError, latest_checkpoint, load_file, save_file
from labelenc.errors import UserError

UNPICKLED: list[str] = []  # filled if a refused file's code ever runs


def _record_unpickling(tag: str) -> str:
    UNPICKLED.append(tag)
    return tag


class Payload:
    """An arbitrary Python object; unpickling it would call ``_record_unpickling``."""

    def __reduce__(self):
        return (_record_unpickling, ("payload",))


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_save_then_load_round_trips_tensors_and_plain_data(tmp_path: Path) -> None:
    """A saved payload reads back equal, stamped with the format version, and leaves no temp file behind."""
    payload = {
        "model": {"w": torch.randn(3, 4), "b": torch.arange(5)},
        "iteration": 7,
        "rng": {"torch": torch.get_rng_state()},
        "config": {"train": {"base_lr": 0.01, "milestones": [4, 5]}, "name": "x"},
        "stage": "step1",
    }
    path = tmp_path / "sub" / "checkpoint.pth"
    save_file(payload, path)
    loaded = load_file(path)
    assert loaded["format_version"] == FORMAT_VERSION and "labelenc_version" in loaded
    assert torch.equal(loaded["model"]["w"], payload["model"]["w"])
    assert torch.equal(loaded["model"]["b"], payload["model"]["b"])
    assert torch.equal(loaded["rng"]["torch"], payload["rng"]["torch"])
    assert loaded["iteration"] == 7 and loaded["config"] == payload["config"] and loaded["stage"] == "step1"
    assert _leftovers(path.parent) == []

    save_file({"iteration": 8}, path)  # replacing an existing file
    assert load_file(path)["iteration"] == 8
    assert _leftovers(path.parent) == []


def test_failed_save_keeps_the_previous_file(tmp_path: Path) -> None:
    """A payload that cannot be written (a lambda) raises, leaves no temp file and keeps the old file intact."""
    path = tmp_path / "checkpoint.pth"
    save_file({"iteration": 1, "w": torch.ones(2)}, path)
    before = path.read_bytes()
    with pytest.raises((pickle.PicklingError, AttributeError, TypeError)):
        save_file({"iteration": 2, "fn": lambda x: x}, path)
    assert path.read_bytes() == before
    assert load_file(path)["iteration"] == 1
    assert _leftovers(tmp_path) == []


def test_arbitrary_object_is_never_loaded(tmp_path: Path) -> None:
    """A payload holding a custom object either fails to save or is refused on load, without running its code."""
    path = tmp_path / "custom.pth"
    UNPICKLED.clear()
    try:
        save_file({"iteration": 1, "obj": Payload()}, path)
    except Exception:
        assert not path.exists()
        return
    with pytest.raises(CheckpointError, match="custom.pth"):
        load_file(path)
    assert UNPICKLED == []


def test_foreign_pickle_is_refused_by_weights_only(tmp_path: Path) -> None:
    """A file pickling an arbitrary Python object (even with a valid format_version) is a CheckpointError."""
    path = tmp_path / "evil.pth"
    torch.save({"format_version": FORMAT_VERSION, "x": Payload()}, path)
    UNPICKLED.clear()
    with pytest.raises(CheckpointError, match="evil.pth") as info:
        load_file(path, kind="weights")
    assert isinstance(info.value, UserError)
    assert "weights" in str(info.value)
    assert UNPICKLED == []


def test_missing_file_is_named(tmp_path: Path) -> None:
    """A missing file is a CheckpointError whose message names the file and the kind of file."""
    path = tmp_path / "nowhere" / "model_final.pth"
    with pytest.raises(CheckpointError, match="not found") as info:
        load_file(path, kind="weights")
    assert str(path) in str(info.value) and "weights" in str(info.value)


@pytest.mark.parametrize("keep", ["empty", "one_byte", "half", "all_but_one"])
def test_truncated_file_is_refused(tmp_path: Path, keep: str) -> None:
    """A truncated checkpoint (any length, including 0 bytes) is a CheckpointError naming the file."""
    good = tmp_path / "good.pth"
    save_file({"model": {"w": torch.randn(64)}, "iteration": 3}, good)
    data = good.read_bytes()
    length = {"empty": 0, "one_byte": 1, "half": len(data) // 2, "all_but_one": len(data) - 1}[keep]
    path = tmp_path / "truncated.pth"
    path.write_bytes(data[:length])
    with pytest.raises(CheckpointError, match="truncated.pth"):
        load_file(path)


@pytest.mark.parametrize(
    "payload, message",
    [
        ({"format_version": FORMAT_VERSION + 1, "model": {}}, f"version {FORMAT_VERSION + 1}"),
        ({"model": {"w": torch.zeros(1)}}, "no format_version"),
        (torch.zeros(3), "no format_version"),
    ],
    ids=["other_version", "no_version", "not_a_dict"],
)
def test_foreign_format_is_refused(tmp_path: Path, payload: object, message: str) -> None:
    """Files of another format version, or not written by save_file at all, are refused with the reason."""
    path = tmp_path / "other.pth"
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match=message) as info:
        load_file(path)
    assert str(path) in str(info.value)


def test_latest_checkpoint_follows_the_pointer_else_the_newest_file(tmp_path: Path) -> None:
    """latest_checkpoint is the file named in last_checkpoint; with a missing, empty or stale pointer, the newest."""
    assert latest_checkpoint(tmp_path) is None
    save_file({"iteration": 2}, tmp_path / "checkpoint_0000002.pth")
    save_file({"iteration": 4}, tmp_path / "checkpoint_0000004.pth")
    (tmp_path / "last_checkpoint").write_text("checkpoint_0000002.pth\n")
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint_0000002.pth"
    for pointer in ["checkpoint_0000006.pth", ""]:
        (tmp_path / "last_checkpoint").write_text(pointer)
        assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint_0000004.pth"
    (tmp_path / "last_checkpoint").unlink()
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint_0000004.pth"
