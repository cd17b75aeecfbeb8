"""torchrun with two CPU processes (gloo): one global batch split over ranks, rank-0 I/O, gathered evaluation, a
non-finite loss on one process only, and kill / resume with each process's RNG state."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import image_first_read_at, run_killed_then_resumed, tiny_raw, truncate_image

from labelenc.config import build_config
from labelenc.engine.checkpoint import load_file
from labelenc.runner import train
from labelenc.stages import LABEL_ENCODER

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def test_torchrun_two_processes(synth_root: Path, tmp_path: Path) -> None:
    """A 2-process run trains, writes each file once from rank 0, and evaluates every val image once."""
    raw = tiny_raw(synth_root, tmp_path / "run")
    raw["train"].update(base_iters=3, batch_size=4, checkpoint_period=3)
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(raw))
    torchrun = Path(sys.executable).with_name("torchrun")
    done = subprocess.run(
        [str(torchrun), "--nproc_per_node", "2", "-m", "labelenc.cli", "train", str(config)],
        env=ENV, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "global batch 4 on 2 process(es)" in done.stderr
    assert done.stderr.count("global batch 4 on 2 process(es)") == 1  # rank 1 does not log
    assert done.stdout.count("weights:") == 1
    assert "COCO bbox evaluation on 8 images" in done.stdout  # both shards gathered
    run = tmp_path / "run"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records] == [1, 2, 3]
    state = load_file(run / "model_final.pth")
    assert state["kind"] == "detector" and not any(k.startswith("module.") for k in state["model"])
    summary = json.loads((run / "run_summary.json").read_text())
    assert summary["metrics"] == json.loads((run / "model_final_eval.json").read_text())


def _torchrun(*args: str) -> list[str]:
    return [str(Path(sys.executable).with_name("torchrun")), "--nproc_per_node", "2", *args]


@pytest.mark.parametrize("stage", ["step1", "step2"])
def test_a_non_finite_loss_on_one_process_is_skipped_by_both(stage: str, synth_root: Path, tmp_path: Path) -> None:
    """A NaN loss on rank 1 only, at iteration 2: both processes skip that step (no hang), log it, and end with
    identical parameters (checked on each process's own copy)."""
    extra: list[str] = []
    if stage == "step2":
        step1 = tiny_raw(synth_root, tmp_path / "step1")
        step1["train"]["base_iters"] = 2
        train(build_config(step1), "step1")
        extra = [str(tmp_path / "step1" / LABEL_ENCODER)]
    raw = tiny_raw(synth_root, tmp_path / "run")
    raw["train"].update(base_iters=4, batch_size=4, checkpoint_period=4)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(raw))
    report = tmp_path / "report.json"
    done = subprocess.run(_torchrun(str(Path(__file__).with_name("ddp_poisoned_run.py")), str(config), stage, "1",
                                    "2", str(report), *extra), env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "iteration 2 skipped: non-finite" in done.stderr
    fingerprints = json.loads(report.read_text())["fingerprints"]
    assert len(fingerprints) == 2 and fingerprints[0] == fingerprints[1]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    skipped = [r["skipped"] for r in records]  # Step 1 runs a warm-up iteration more
    assert skipped[2] == 1.0 and skipped.count(1.0) == 1 and len(skipped) == (5 if stage == "step1" else 4)


def test_two_process_kill_and_resume_equals_an_uninterrupted_run(synth_root: Path, tmp_path: Path) -> None:
    """Faster R-CNN (its samplers draw from each process's RNG) on 2 processes: killed after its first checkpoint
    and resumed, it ends with the weights of an uninterrupted 2-process run; logged losses are process means."""
    finals = {}
    for name in ("uninterrupted", "killed"):
        raw = tiny_raw(synth_root, tmp_path / name, "faster_rcnn")
        raw["train"].update(base_iters=8, batch_size=4, checkpoint_period=2, keep_checkpoints=2)
        config = tmp_path / f"{name}.yaml"
        config.write_text(yaml.safe_dump(raw))
        command = _torchrun("-m", "labelenc.cli", "train", str(config))
        if name == "killed":
            run_killed_then_resumed(command, tmp_path / name, ENV)
        else:
            done = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=600)
            assert done.returncode == 0, done.stderr[-3000:]
        finals[name] = load_file(tmp_path / name / "model_final.pth")["model"]
    assert all(torch.equal(finals["killed"][k], finals["uninterrupted"][k]) for k in finals["uninterrupted"])
    checkpoint = load_file(tmp_path / "killed" / "checkpoint_0000008.pth")
    assert len(checkpoint["rng_per_process"]) == 2
    assert not torch.equal(checkpoint["rng_per_process"][0]["torch"], checkpoint["rng_per_process"][1]["torch"])


def test_an_unreadable_image_on_one_process_stops_both_after_saving_the_state(synth_root: Path, tmp_path: Path) -> None:
    """An image only process 1 reads, at iteration 2, stops both processes together (no hang, no lost work): the
    error names the file and a checkpoint of iteration 2, and --resume after fixing the file finishes the run."""
    data = tmp_path / "data"
    shutil.copytree(synth_root, data)
    raw = tiny_raw(data, tmp_path / "run")
    raw["train"].update(base_iters=4, batch_size=4, checkpoint_period=4)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(raw))
    image = image_first_read_at(build_config(raw), 2, rank=1, world_size=2)
    original = truncate_image(image)
    command = _torchrun("-m", "labelenc.cli", "train", str(config))
    failed = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=300)
    assert failed.returncode != 0
    checkpoint = tmp_path / "run" / "checkpoint_0000002.pth"
    errors = [line for line in failed.stderr.splitlines() if line.startswith("labelenc: error:")]
    assert errors and "[rank0]: Traceback" not in failed.stderr, failed.stderr[-3000:]  # rank 0 used to die in gloo
    assert all(f"cannot read image {image}" in e and f"saved in {checkpoint}" in e for e in errors)
    assert load_file(checkpoint)["iteration"] == 2

    image.write_bytes(original)
    done = subprocess.run([*command, "--resume"], env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records] == [1, 2, 3, 4]
