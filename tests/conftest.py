"""Shared fixtures: a tiny synthetic COCO dataset and tiny CPU configs for every detector family."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from labelenc.config import Config, build_config
from labelenc.data.loader import build_datasets, build_train_loader
from labelenc.data.synth import generate_synthetic_dataset

torch.set_num_threads(1)  # tiny models gain nothing from threads, and lose a lot on a loaded machine


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """16 training and 8 validation images of 64 px with 3 classes (instance masks included)."""
    root = tmp_path_factory.mktemp("synth")
    generate_synthetic_dataset(root, seed=0, num_train=16, num_val=8, image_size=64, num_classes=3, max_objects=4)
    return root


def tiny_raw(synth_root: Path, output_dir: Path, family: str = "retinanet") -> dict:
    """A raw config mapping of a tiny model that trains in well under a second per iteration on a CPU."""
    return {
        "model": {
            "family": family,
            "backbone": "resnet18",
            "fpn_channels": 32 if family == "fcos" else 16,  # FCOS's head uses GroupNorm(32)
            "min_size": 64,
            "max_size": 64,
            "anchor_sizes": None if family == "fcos" else [8, 16, 32, 64, 128],
        },
        "data": {
            "train": {"annotations": str(synth_root / "annotations/instances_train.json"), "images": str(synth_root / "train")},
            "val": {"annotations": str(synth_root / "annotations/instances_val.json"), "images": str(synth_root / "val")},
            "num_workers": 0,
        },
        "train": {
            "base_iters": 6,
            "batch_size": 2,
            "base_lr": 0.01,
            "reference_batch_size": 2,
            "warmup_iters": 2,
            "checkpoint_period": 2,
            "log_period": 1,
            "device": "cpu",
            "deterministic": True,
        },
        "labelenc": {"encoder_width": 0.0625},
        "output_dir": str(output_dir),
    }


@pytest.fixture
def tiny_config(synth_root: Path, tmp_path: Path):
    """Factory: ``tiny_config(family="retinanet", **section_updates) -> Config`` writing into ``tmp_path``."""

    def make(family: str = "retinanet", **sections: dict) -> Config:
        raw = tiny_raw(synth_root, tmp_path / "run", family)
        for section, values in sections.items():
            if isinstance(values, dict):
                raw[section].update(values)
            else:
                raw[section] = values
        return build_config(raw)

    return make


def write_image(path: Path, width: int, height: int) -> None:
    """A random RGB image of the given size (JPEG or PNG after the suffix)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(width * 100 + height).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def voc_xml(stem: str, width: int, height: int, objects: list) -> str:
    """A VOC annotation file as LabelImg / the VOC devkit write it; objects are (name, difficult, (x1, y1, x2, y2))."""
    parts = [f"<annotation><folder>VOC2007</folder><filename>{stem}.jpg</filename>",
             f"<size><width>{width}</width><height>{height}</height><depth>3</depth></size>"]
    for name, difficult, (xmin, ymin, xmax, ymax) in objects:
        parts.append(f"<object><name>{name}</name><pose>Left</pose><truncated>0</truncated>"
                     f"<difficult>{difficult}</difficult><bndbox><xmin>{xmin}</xmin><ymin>{ymin}</ymin>"
                     f"<xmax>{xmax}</xmax><ymax>{ymax}</ymax></bndbox></object>")
    return "".join(parts) + "</annotation>"


def run_killed_then_resumed(command: list[str], output_dir: Path, env: dict[str, str]) -> None:
    """Start a training command, SIGKILL it (its whole process group: torchrun and its workers too) once its
    first checkpoint exists, then finish it with ``--resume``."""
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    deadline = time.monotonic() + 240
    while not (output_dir / "checkpoint_0000002.pth").exists():
        assert proc.poll() is None, f"run ended before its first checkpoint: {proc.stderr.read().decode()[-2000:]}"
        assert time.monotonic() < deadline, "no checkpoint within the time limit"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (output_dir / "model_final.pth").exists(), "the run finished before it was killed"
    resumed = subprocess.run([*command, "--resume"], env=env, capture_output=True)
    assert resumed.returncode == 0, resumed.stderr.decode()[-2000:]


def image_first_read_at(cfg: Config, iteration: int, rank: int = 0, world_size: int = 1) -> Path:
    """A training image that process ``rank`` of ``world_size`` reads at ``iteration`` and no process reads before."""
    train_set, _ = build_datasets(cfg, with_masks=False)

    def image_ids(start: int, rank: int, world_size: int) -> list[int]:
        _, targets = next(iter(build_train_loader(train_set, cfg, start, rank, world_size)))
        return [int(t["image_id"]) for t in targets]

    read_before = {i for it in range(iteration) for i in image_ids(it, 0, 1)}
    unread = [i for i in image_ids(iteration, rank, world_size) if i not in read_before]
    assert unread, f"every image of process {rank}'s batch {iteration} is read earlier"
    return train_set.image_dir / train_set.coco.imgs[unread[0]]["file_name"]


def truncate_image(path: Path) -> bytes:
    """Cut an image after its header (the run-start check reads headers only, so only decoding fails); returns the
    original bytes."""
    original = path.read_bytes()
    path.write_bytes(original[:100])
    return original
