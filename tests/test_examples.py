"""Every command example of the README and of ``--help`` runs, exactly as written, in a miniature project folder.

The folder holds what the examples name: ``configs/demo_cpu.yaml`` and ``configs/african_wildlife_cpu.yaml`` (the
real configs with a tiny model and schedule, so that each run takes seconds), the synthetic data the first example
writes, a small VOC year folder, a YOLO folder and a stand-in of the African Wildlife download (a few small JPEGs
in its layout; the real dataset is never fetched). ``make demo`` and ``make test`` (set-up, the full demo, and this
very suite) are left out.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import voc_xml, write_image

from labelenc.cli import EXAMPLES

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

# Every example, in an order in which each finds the files the earlier ones wrote.
ORDER = [
    "labelenc data synth --out data/synth --seed 0",
    "labelenc data synth --out data/big --num-train 500 --image-size 256",
    "labelenc data check configs/demo_cpu.yaml",
    "labelenc data check configs/demo_cpu.yaml data.strict=true",
    "labelenc data convert --from voc data/VOCdevkit/VOC2007 --split trainval --out data/voc07_trainval.json",
    "labelenc data convert --from yolo data/shapes --split train --out data/shapes_train.json --classes circle,square",
    "labelenc data convert --from yolo data/shapes --split train --classes circle,square --out data/shapes_train.json",
    "labelenc data convert --from yolo data/shapes --out data/shapes.json --classes data/shapes/classes.txt",
    "labelenc data check my_voc.yaml",
    "labelenc data check my_voc.yaml --strict",
    "labelenc data check configs/african_wildlife_cpu.yaml",
    "labelenc train configs/demo_cpu.yaml",
    "labelenc train configs/demo_cpu.yaml --resume",
    "labelenc train configs/demo_cpu.yaml train.batch_size=8 output_dir=runs/b8",
    "labelenc train configs/demo_cpu.yaml --init-weights runs/demo/model_final.pth output_dir=runs/finetune",
    "labelenc pipeline configs/demo_cpu.yaml",
    "labelenc eval configs/demo_cpu.yaml --weights runs/demo/seed0/baseline_1x/model_final.pth",
    "labelenc export configs/demo_cpu.yaml --weights runs/demo/seed0/step2/model_final.pth --format onnx "
    "--out runs/demo/detector.onnx",
    "labelenc export configs/demo_cpu.yaml --weights runs/demo/seed0/step2/model_final.pth --format torchscript "
    "--out runs/demo/detector.pt",
    "labelenc pipeline configs/demo_cpu.yaml --seeds 0,1,2 --jobs 2",
    "labelenc pipeline configs/demo_cpu.yaml --skip-baselines --label-encoder runs/demo/seed0/step1/label_encoder.pth",
    "labelenc pipeline configs/african_wildlife_cpu.yaml",
    "labelenc ablate configs/demo_cpu.yaml --table 4",
    "labelenc ablate configs/demo_cpu.yaml --table 2",
    "labelenc ablate configs/demo_cpu.yaml --table 5",
    "labelenc ablate configs/demo_cpu.yaml --table 3 --other-backbone resnet34",
    "labelenc ablate configs/demo_cpu.yaml --table 6 --seeds 0,1,2",
    "labelenc ablate configs/demo_cpu.yaml --table 6 --teacher runs/demo/seed0/baseline_2x/model_final.pth "
    "output_dir=runs/kd",
    "labelenc ablate configs/demo_cpu.yaml --table 7 model.family=mask_rcnn output_dir=runs/mask",
    "labelenc step1 configs/demo_cpu.yaml output_dir=runs/step1",
    "labelenc step2 configs/demo_cpu.yaml --label-encoder runs/step1/label_encoder.pth output_dir=runs/step2",
    "labelenc step1 configs/demo_cpu.yaml output_dir=runs/s1",
    "labelenc step2 configs/demo_cpu.yaml --label-encoder runs/s1/label_encoder.pth output_dir=runs/s2",
    "labelenc step1-recon configs/demo_cpu.yaml output_dir=runs/s1r",
    "labelenc step2 configs/demo_cpu.yaml --teacher runs/demo/seed0/baseline_2x/model_final.pth output_dir=runs/kd2",
    "torchrun --nproc_per_node 2 -m labelenc.cli train configs/demo_cpu.yaml output_dir=runs/ddp",
]
# What a run's files must show afterwards (a folder, or a file that must exist), beyond exit code 0.
WRITES = {
    "labelenc train configs/demo_cpu.yaml": "runs/demo/model_final.pth",
    "labelenc pipeline configs/demo_cpu.yaml --seeds 0,1,2 --jobs 2": "runs/demo/seed2/step2/run_summary.json",
    "labelenc step2 configs/demo_cpu.yaml --label-encoder runs/s1/label_encoder.pth output_dir=runs/s2":
        "runs/s2/model_final.pth",
    "labelenc step1-recon configs/demo_cpu.yaml output_dir=runs/s1r": "runs/s1r/label_encoder.pth",
    "labelenc step2 configs/demo_cpu.yaml --teacher runs/demo/seed0/baseline_2x/model_final.pth output_dir=runs/kd2":
        "runs/kd2/model_final.pth",
    "torchrun --nproc_per_node 2 -m labelenc.cli train configs/demo_cpu.yaml output_dir=runs/ddp":
        "runs/ddp/model_final.pth",
    "labelenc export configs/demo_cpu.yaml --weights runs/demo/seed0/step2/model_final.pth --format onnx "
    "--out runs/demo/detector.onnx": "runs/demo/detector.onnx",
    "labelenc pipeline configs/african_wildlife_cpu.yaml": "runs/african_wildlife/seed0/step2/model_final.pth",
}
# FPN 64 as the real demo: FCOS's GroupNorm(32) over 32 channels cannot run a single 64-px image (1x1 P7), as
# the export examples do. 10 detections per image instead of 100: an untrained Mask R-CNN keeps all 100 (its class
# scores sit far above the 0.05 threshold), and torchvision's 256-wide mask head on 100 boxes x 64 val images made
# evaluation 4/5 of the Table-7 example's 5 minutes. Every evaluation still runs whole (boxes, pasted masks, COCO
# bbox and segm AP), on fewer boxes.
TINY = {"model": {"backbone": "resnet18", "fpn_channels": 64, "min_size": 64, "max_size": 64,
                  "detections_per_image": 10},
        "train": {"base_iters": 2, "batch_size": 4, "warmup_iters": 1, "checkpoint_period": 2, "log_period": 1,
                  "keep_checkpoints": 1},
        "data": {"num_workers": 0}, "labelenc": {"encoder_width": 0.0625}}


def documented_examples() -> set[str]:
    """Command lines in the README's bash blocks and in every ``--help`` epilog (comments stripped)."""
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    lines = [line for block in blocks for line in block.splitlines()]
    lines += [line for text in EXAMPLES.values() for line in text.splitlines()]
    commands = {re.sub(r"\s+#.*$", "", line).strip() for line in lines}
    return {c for c in commands if c and not c.startswith("make ")}


def _tiny(raw: dict) -> dict:
    for section, values in TINY.items():
        raw.setdefault(section, {}).update(values)
    return raw


def _write_voc(root: Path) -> None:
    """A VOC year folder: 6 images in trainval, 2 in test, boxes inside the images (no warnings)."""
    stems = {"trainval": [f"{i:06d}" for i in range(1, 7)], "test": ["000007", "000008"]}
    (root / "ImageSets" / "Main").mkdir(parents=True)
    for split, names in stems.items():
        (root / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(names) + "\n")
        for k, stem in enumerate(names):
            write_image(root / "JPEGImages" / f"{stem}.jpg", 64, 48)
            objects = [("dog", 0, (5, 5, 30, 40)), ("cat", 0, (20 + k, 8, 60, 30))]
            (root / "Annotations").mkdir(exist_ok=True)
            (root / "Annotations" / f"{stem}.xml").write_text(voc_xml(stem, 64, 48, objects))


def _write_yolo(root: Path) -> None:
    """A YOLO folder with images/ and labels/ (no split) and images/train, labels/train, plus classes.txt."""
    for split in ("", "train"):
        for k in range(3):
            write_image(root / "images" / split / f"{k}.png", 40, 32)
            (root / "labels" / split).mkdir(parents=True, exist_ok=True)
            (root / "labels" / split / f"{k}.txt").write_text(f"{k % 2} 0.5 0.5 0.4 0.3\n")
    (root / "classes.txt").write_text("circle\nsquare\n")


def _write_african_wildlife(root: Path) -> None:
    """A stand-in of the unzipped African Wildlife download: <root>/{train,valid}/{images,labels}, small JPEGs
    with YOLO labels of its 4 classes (one training image without a label file: a negative)."""
    for split, count in (("train", 6), ("valid", 3)):
        for k in range(count):
            write_image(root / split / "images" / f"{split}_{k}.jpg", 96, 64)
            (root / split / "labels").mkdir(parents=True, exist_ok=True)
            if split == "train" and k == count - 1:
                continue
            lines = [f"{k % 4} 0.5 0.5 0.6 0.7", f"{(k + 1) % 4} 0.25 0.3 0.2 0.3"]
            (root / split / "labels" / f"{split}_{k}.txt").write_text("\n".join(lines) + "\n")


def _output_dir(project: Path, argv: list[str]) -> str:
    """The run folder of a command: its ``output_dir=`` override, else its config's ``output_dir``."""
    override = next((a.split("=", 1)[1] for a in argv if a.startswith("output_dir=")), None)
    return override or yaml.safe_load((project / argv[2]).read_text())["output_dir"]


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder laid out like a checkout, with tiny stand-ins for what the examples read."""
    root = tmp_path_factory.mktemp("project")
    (root / "configs").mkdir()
    for name in ("demo_cpu.yaml", "african_wildlife_cpu.yaml"):
        raw = yaml.safe_load((ROOT / "configs" / name).read_text())
        (root / "configs" / name).write_text(yaml.safe_dump(_tiny(raw)))
    _write_african_wildlife(root / "data" / "african-wildlife")
    _write_voc(root / "data" / "VOCdevkit" / "VOC2007")
    _write_yolo(root / "data" / "shapes")
    voc = {"data": {"train": {"format": "voc", "root": "data/VOCdevkit/VOC2007", "split": "trainval"},
                    "val": {"format": "voc", "root": "data/VOCdevkit/VOC2007", "split": "test"}},
           "model": {"family": "fcos"}}
    (root / "my_voc.yaml").write_text(yaml.safe_dump(_tiny(voc)))
    return root


def test_every_documented_example_is_run_here() -> None:
    """A new example in the README or a --help text must be added to ORDER (and so be run)."""
    assert documented_examples() == set(ORDER)


@pytest.mark.parametrize("command", ORDER)
def test_example_runs_as_written(project: Path, command: str) -> None:
    argv = shlex.split(command)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    done = subprocess.run([str(BIN / argv[0]), *argv[1:]], cwd=project, env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, f"{command}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    assert "Traceback" not in done.stderr
    if command in WRITES:
        assert (project / WRITES[command]).is_file()
    if argv[1] == "ablate":
        table = argv[argv.index("--table") + 1]
        output = project / _output_dir(project, argv)
        report = json.loads((output / f"table{table}.json").read_text())
        assert report["rows"] and (output / f"table{table}.png").is_file()
    if argv[1] == "pipeline":
        output = project / _output_dir(project, argv)
        report = json.loads((output / "report.json").read_text())
        assert report["rows"] and (output / "report.md").is_file()
