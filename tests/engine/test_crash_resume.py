"""Crash safety: a training process killed with SIGKILL resumes to the same weights as an uninterrupted run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import run_killed_then_resumed, tiny_raw

from labelenc.config import build_config
from labelenc.engine.checkpoint import load_file
from labelenc.runner import FINAL_WEIGHTS, train
from labelenc.stages import LABEL_ENCODER

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}  # the same arithmetic in every process


def _write_config(raw: dict, path: Path) -> Path:
    path.write_text(yaml.safe_dump(raw))
    return path


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "labelenc.cli", *args]


def _uninterrupted(command: str, config: Path, extra: list[str]) -> None:
    done = subprocess.run(_cli(command, str(config), *extra), env=ENV, capture_output=True)
    assert done.returncode == 0, done.stderr.decode()[-2000:]


def _final_state(output_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(output_dir / FINAL_WEIGHTS)["model"]


@pytest.mark.parametrize("stage", ["train", "step2"])
def test_sigkill_then_resume_equals_an_uninterrupted_run(stage: str, synth_root: Path, tmp_path: Path) -> None:
    """Kill -9 mid-run loses at most a checkpoint interval; --resume ends on bit-identical final weights."""
    extra: list[str] = []
    if stage == "step2":
        step1 = tiny_raw(synth_root, tmp_path / "step1")
        step1["train"]["base_iters"] = 2
        train(build_config(step1), "step1")
        extra = ["--label-encoder", str(tmp_path / "step1" / LABEL_ENCODER)]
    results = {}
    for name in ("killed", "uninterrupted"):
        raw = tiny_raw(synth_root, tmp_path / name)
        raw["train"].update(base_iters=30, checkpoint_period=2, keep_checkpoints=2)  # 2: keeps the disk small
        config = _write_config(raw, tmp_path / f"{name}.yaml")
        if name == "killed":
            run_killed_then_resumed(_cli(stage, str(config), *extra), tmp_path / name, ENV)
        else:
            _uninterrupted(stage, config, extra)
        results[name] = _final_state(tmp_path / name)
    killed, uninterrupted = results["killed"], results["uninterrupted"]
    assert killed.keys() == uninterrupted.keys()
    different = [k for k in killed if not torch.equal(killed[k], uninterrupted[k])]
    assert not different, f"{len(different)} tensors differ after resume, e.g. {different[:3]}"
