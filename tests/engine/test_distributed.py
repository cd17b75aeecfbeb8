"""torchrun with two CPU processes (gloo): one global batch split over ranks, rank-0 I/O, gathered evaluation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml
from conftest import tiny_raw

from labelenc.engine.checkpoint import load_file


def test_torchrun_two_processes(synth_root: Path, tmp_path: Path) -> None:
    """A 2-process run trains, writes each file once from rank 0, and evaluates every val image once."""
    raw = tiny_raw(synth_root, tmp_path / "run")
    raw["train"].update(base_iters=3, batch_size=4, checkpoint_period=3)
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(raw))
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [str(torchrun), "--nproc_per_node", "2", "-m", "labelenc.cli", "train", str(config)],
        env=env, capture_output=True, text=True, timeout=600,
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
