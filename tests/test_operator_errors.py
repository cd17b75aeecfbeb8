"""Operator errors end with one clear line and exit code 2, before any training starts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from conftest import tiny_raw

from labelenc.cli import main


def _config_file(synth_root: Path, tmp_path: Path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_raw(synth_root, tmp_path / "run")))
    return path


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(argv)
    err = capsys.readouterr().err
    return code, err


def test_unwritable_output_directory(synth_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An output directory that cannot be created is named in one error line (no traceback, nothing trained)."""
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    code, err = _run(["train", str(_config_file(synth_root, tmp_path)), f"output_dir={blocker}/run"], capsys)
    assert code == 2
    assert "not writable" in err and str(blocker) in err
    assert "Traceback" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_gpu_requested_without_one(synth_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """train.device=cuda on a CPU-only machine says so and how to fix it."""
    code, err = _run(["train", str(_config_file(synth_root, tmp_path)), "train.device=cuda"], capsys)
    assert code == 2
    assert "train.device=cuda" in err and "train.device=cpu" in err
    assert not (tmp_path / "run").exists()
