"""Tests of labelenc.data.formats: Pascal VOC and YOLO datasets as COCO dicts, `data convert`, configs using them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import voc_xml, write_image
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from pycocotools.coco import COCO

from labelenc import runner
from labelenc.cli import main
from labelenc.config import ConfigError
from labelenc.data.coco import CocoDetection, coco_from_dict
from labelenc.data.formats import SOURCE_KEYS, voc_to_coco, write_coco, yolo_to_coco
from labelenc.data.loader import build_datasets
from labelenc.data.problems import DataError, DataValidationError, Problem
from labelenc.data.validate import validate_coco
from labelenc.evaluation import CocoEvaluator

# VOC: image stem -> (width, height, [(name, difficult, (xmin, ymin, xmax, ymax))]), 1-based inclusive pixels
VOC_IMAGES = {
    "000001": (40, 30, [("dog", 0, (1.5, 2.0, 20.5, 15.0)), ("cat", 1, (5.0, 5.0, 10.0, 10.0))]),
    "000002": (36, 28, [("dog", 0, (1.0, 1.0, 36.0, 28.0))]),  # the whole image
    "000003": (32, 32, []),  # a negative
    "000004": (30, 20, [("cat", 0, (2.0, 3.0, 12.0, 9.0)), ("bird", 0, (4.0, 4.0, 8.0, 8.0))]),
}
VOC_SPLITS = {"train": ["000004", "000001", "000003"], "val": ["000002"]}
# YOLO: split -> image name -> ((width, height), label file text or None for no label file)
YOLO_IMAGES = {
    "train": {
        "a.png": ((50, 40), "0 0.5 0.5 0.2 0.5\n1 0.1 0.1 0.2 0.2\n"),
        "b.png": ((30, 20), ""),  # empty label file: a negative
        "c.jpg": ((20, 24), None),  # no label file: a negative
    },
    "val": {"d.png": ((40, 40), "1 0.5 0.5 0.5 0.25\n")},
}
YOLO_CLASSES = ["circle", "square"]


@pytest.fixture
def voc_root(tmp_path: Path) -> Path:
    """A VOC year folder with :data:`VOC_IMAGES` (JPEGs) and the ImageSets/Main split files of VOC_SPLITS."""
    root = tmp_path / "VOC2007"
    (root / "Annotations").mkdir(parents=True)
    (root / "ImageSets" / "Main").mkdir(parents=True)
    for stem, (width, height, objects) in VOC_IMAGES.items():
        write_image(root / "JPEGImages" / f"{stem}.jpg", width, height)
        (root / "Annotations" / f"{stem}.xml").write_text(voc_xml(stem, width, height, objects))
    for split, stems in VOC_SPLITS.items():
        (root / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(stems) + "\n")
    return root


@pytest.fixture
def yolo_root(tmp_path: Path) -> Path:
    """A YOLO folder with :data:`YOLO_IMAGES` under images/<split>, labels/<split> and a classes.txt."""
    root = tmp_path / "yolo"
    for split, images in YOLO_IMAGES.items():
        (root / "labels" / split).mkdir(parents=True)
        for name, ((width, height), text) in images.items():
            write_image(root / "images" / split / name, width, height)
            if text is not None:
                (root / "labels" / split / f"{Path(name).stem}.txt").write_text(text)
    (root / "classes.txt").write_text("\n".join(YOLO_CLASSES) + "\n")
    return root


def _boxes(dataset: dict) -> list[tuple[str, str, list[float], int]]:
    """(file name, class name, bbox, iscrowd) of every annotation, in annotation order."""
    files = {i["id"]: i["file_name"] for i in dataset["images"]}
    names = {c["id"]: c["name"] for c in dataset["categories"]}
    return [(files[a["image_id"]], names[a["category_id"]], a["bbox"], a["iscrowd"]) for a in dataset["annotations"]]


def test_voc_boxes_follow_the_one_based_convention_and_difficult_is_crowd(voc_root: Path) -> None:
    """VOC (xmin, ymin, xmax, ymax) becomes [xmin-1, ymin-1, xmax-xmin+1, ymax-ymin+1]; difficult -> iscrowd=1."""
    dataset = voc_to_coco(voc_root, split="train")
    assert [i["file_name"] for i in dataset["images"]] == [f"JPEGImages/{s}.jpg" for s in VOC_SPLITS["train"]]
    assert [(i["id"], i["width"], i["height"]) for i in dataset["images"]] == [(1, 30, 20), (2, 40, 30), (3, 32, 32)]
    assert [c["name"] for c in dataset["categories"]] == ["bird", "cat", "dog"]  # inferred: sorted names
    assert [c["id"] for c in dataset["categories"]] == [1, 2, 3]
    assert _boxes(dataset) == [
        ("JPEGImages/000004.jpg", "cat", [1.0, 2.0, 11.0, 7.0], 0),
        ("JPEGImages/000004.jpg", "bird", [3.0, 3.0, 5.0, 5.0], 0),
        ("JPEGImages/000001.jpg", "dog", [0.5, 1.0, 20.0, 14.0], 0),  # float coordinates kept
        ("JPEGImages/000001.jpg", "cat", [4.0, 4.0, 6.0, 6.0], 1),  # difficult
    ]
    assert [a["id"] for a in dataset["annotations"]] == [1, 2, 3, 4]
    whole = voc_to_coco(voc_root, split="val")
    assert _boxes(whole) == [("JPEGImages/000002.jpg", "dog", [0.0, 0.0, 36.0, 28.0], 0)]  # exactly the image
    cleaned, problems = validate_coco(whole, voc_root, str(voc_root))
    assert problems == [] and cleaned["annotations"][0]["bbox"] == [0.0, 0.0, 36.0, 28.0]


def test_voc_class_list_from_config_keeps_its_order_and_split_none_takes_all(voc_root: Path) -> None:
    """Given class names fix the category order; without a split every XML is read in sorted order."""
    dataset = voc_to_coco(voc_root, class_names=["dog", "cat", "person", "bird"])
    assert [(c["id"], c["name"]) for c in dataset["categories"]] == [(1, "dog"), (2, "cat"), (3, "person"), (4, "bird")]
    assert [i["file_name"] for i in dataset["images"]] == [f"JPEGImages/{s}.jpg" for s in sorted(VOC_IMAGES)]
    assert [a["category_id"] for a in dataset["annotations"]] == [1, 2, 1, 2, 4]
    assert voc_to_coco(voc_root, class_names=["dog", "cat", "person", "bird"]) == dataset  # deterministic


def test_voc_difficult_objects_are_ignored_in_training_and_evaluation(voc_root: Path) -> None:
    """A difficult object is no training target, and a detector that misses it still scores AP 1 (VOC's rule)."""
    dataset, _ = validate_coco(voc_to_coco(voc_root, split="train"), voc_root, str(voc_root))
    ds = CocoDetection.from_dataset(dataset, voc_root, str(voc_root))
    image_id = 2  # 000001: a dog and a difficult cat
    _, target = ds[ds.image_ids.index(image_id)]
    assert target["labels"].tolist() == [ds.category_to_label[3]]  # the dog only
    evaluator = CocoEvaluator(coco_from_dict(dataset), ds.label_to_category, ("bbox",))
    for image in ds.image_ids:  # perfect detections of every non-difficult object, nothing on the cat
        anns = [a for a in dataset["annotations"] if a["image_id"] == image and not a["iscrowd"]]
        boxes = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)]).reshape(-1, 4)
        labels = torch.tensor([ds.category_to_label[a["category_id"]] for a in anns], dtype=torch.int64)
        evaluator.update([image], [{"boxes": boxes, "scores": torch.ones(len(anns)), "labels": labels}])
    assert evaluator.summarize()["bbox"]["AP"] == pytest.approx(1.0)


@pytest.mark.parametrize(
    "stem, xml, expected",
    [
        ("000001", "<annotation><object><name>dog", "cannot parse the annotation XML"),
        ("000001", voc_xml("000001", 40, 30, [("dog", 0, (1, 2, 3, 4))]).replace("<xmax>3</xmax>", ""), "no <xmax>"),
        ("000001", voc_xml("000001", 40, 30, [("dog", 0, (1, 2, "x", 4))]), "<xmax> is not a number"),
        ("000002", voc_xml("000002", 36, 28, [("horse", 0, (1, 2, 3, 4))]), "'horse' is not in the class list"),
    ],
    ids=["broken-xml", "no-xmax", "not-a-number", "unknown-class"],
)
def test_voc_problems_name_the_xml_file(voc_root: Path, stem: str, xml: str, expected: str) -> None:
    """Unreadable XML, bad boxes and unknown classes are error Problems naming the XML file, not tracebacks."""
    path = voc_root / "Annotations" / f"{stem}.xml"
    path.write_text(xml)
    problems: list[Problem] = []
    dataset = voc_to_coco(voc_root, class_names=["bird", "cat", "dog"], problems=problems)
    assert [(p.severity, p.file) for p in problems] == [("error", str(path))]
    assert expected in problems[0].message
    assert len(dataset["images"]) == len(VOC_IMAGES) - (expected.startswith("cannot parse"))
    with pytest.raises(DataValidationError, match=expected):  # without a list the problems are raised
        voc_to_coco(voc_root, class_names=["bird", "cat", "dog"])


@pytest.mark.parametrize("box, expected", [((20, 5, 10, 15), "xmin > xmax"), ((2, 15.5, 10, 5), "ymin > ymax")])
def test_inverted_voc_box_is_reported_with_the_xml_values(voc_root: Path, box: tuple, expected: str) -> None:
    """A VOC box with xmin > xmax (or ymin > ymax) is a warning quoting the XML's own coordinates; it is dropped."""
    path = voc_root / "Annotations" / "000002.xml"
    path.write_text(voc_xml("000002", 36, 28, [("dog", 0, box)]))
    problems: list[Problem] = []
    dataset = voc_to_coco(voc_root, split="val", problems=problems)
    written = ", ".join(f"{tag}={value:g}" for tag, value in zip(("xmin", "ymin", "xmax", "ymax"), box))
    assert [str(p) for p in problems] == [f"warning: {path}: image 1: object 1: box {written} has {expected}; dropped"]
    assert dataset["annotations"] == [] and validate_coco(dataset, voc_root, str(voc_root))[1] == []


def test_yolo_normalised_boxes_become_pixels_with_the_real_image_size(yolo_root: Path) -> None:
    """cx cy w h in [0, 1] times the file's size; images without a label file or with an empty one are negatives."""
    dataset = yolo_to_coco(yolo_root, split="train")
    assert [(c["id"], c["name"]) for c in dataset["categories"]] == [(1, "circle"), (2, "square")]
    assert [(i["file_name"], i["width"], i["height"]) for i in dataset["images"]] == [
        ("images/train/a.png", 50, 40), ("images/train/b.png", 30, 20), ("images/train/c.jpg", 20, 24)]
    boxes = _boxes(dataset)
    assert [b[:2] for b in boxes] == [("images/train/a.png", "circle"), ("images/train/a.png", "square")]
    np.testing.assert_allclose([b[2] for b in boxes], [[20, 10, 10, 20], [0, 0, 10, 8]], atol=1e-9)
    val = yolo_to_coco(yolo_root, split="val", class_names=["circle", "square"])
    np.testing.assert_allclose([b[2] for b in _boxes(val)], [[10, 15, 20, 10]], atol=1e-9)
    cleaned, problems = validate_coco(dataset, yolo_root, str(yolo_root))
    assert problems == []
    ds = CocoDetection.from_dataset(cleaned, yolo_root, str(yolo_root))
    targets = [ds[i][1] for i in range(len(ds))]
    assert [t["boxes"].shape[0] for t in targets] == [2, 0, 0]
    torch.testing.assert_close(targets[0]["boxes"].as_subclass(torch.Tensor),
                               torch.tensor([[20.0, 10, 30, 30], [0, 0, 10, 8]]))


@pytest.mark.parametrize(
    "files, expected",
    [
        ({"data.yaml": "path: .\nnames:\n  0: circle\n  1: square\n"}, ["circle", "square"]),
        ({"dataset.yaml": "names: [square, circle]\n"}, ["square", "circle"]),
        ({}, None),
    ],
    ids=["data-yaml-dict", "dataset-yaml-list", "none"],
)
def test_yolo_class_names_from_yaml_or_an_error_asking_for_them(
    yolo_root: Path, files: dict, expected: list | None
) -> None:
    """Without classes.txt the names come from data.yaml / dataset.yaml; with none, a DataError asks for them."""
    (yolo_root / "classes.txt").unlink()
    for name, text in files.items():
        (yolo_root / name).write_text(text)
    if expected is None:
        with pytest.raises(DataError, match="class_names.*classes.txt"):
            yolo_to_coco(yolo_root, split="train")
    else:
        assert [c["name"] for c in yolo_to_coco(yolo_root, split="train")["categories"]] == expected


@pytest.mark.parametrize(
    "line, expected",
    [
        ("0 0.5 0.5 0.2", "expected 5 fields"),
        ("0 0.5 0.5 0.2 0.2 0.9", "expected 5 fields"),
        ("dog 0.5 0.5 0.2 0.2", "not numbers"),
        ("2 0.5 0.5 0.2 0.2", "class index 2 is not in 0..1"),
        ("-1 0.5 0.5 0.2 0.2", "class index -1"),
        ("0.5 0.5 0.5 0.2 0.2", "not an integer"),
        ("0 nan 0.5 0.2 0.2", "finite"),
    ],
)
def test_malformed_yolo_lines_are_reported_with_file_and_line(yolo_root: Path, line: str, expected: str) -> None:
    """A bad label line is an error Problem with the label file and line number; the other lines still convert."""
    label = yolo_root / "labels" / "train" / "a.txt"
    label.write_text("0 0.5 0.5 0.2 0.5\n\n" + line + "\n")
    problems: list[Problem] = []
    dataset = yolo_to_coco(yolo_root, split="train", problems=problems)
    assert [(p.severity, p.file, p.line, p.image_id) for p in problems] == [("error", str(label), 3, 1)]
    assert expected in problems[0].message and f"{label}:3: image 1: " in str(problems[0])
    assert len(dataset["annotations"]) == 1
    with pytest.raises(DataValidationError) as info:
        yolo_to_coco(yolo_root, split="train")
    assert f"{label}:3" in str(info.value)


def test_yolo_pixel_coordinates_are_named_and_a_split_without_boxes_is_an_error(yolo_root: Path, tiny_config) -> None:
    """Box values above 1 suggest pixel coordinates (file:line); a training split left without boxes stops the run."""
    label = yolo_root / "labels" / "train" / "a.txt"
    label.write_text("0 25 20 10 20\n1 0.1 0.1 0.2 0.2\n")
    problems: list[Problem] = []
    dataset = yolo_to_coco(yolo_root, split="train", problems=problems)
    assert [(p.severity, p.file, p.line) for p in problems] == [("warning", str(label), 1)]
    message = str(problems[0])
    assert f"{label}:1: image 1: box '25 20 10 20' has values above 1" in message and "pixel coordinates" in message
    assert len(dataset["annotations"]) == 1
    label.write_text("0 25 20 10 20\n1 5 4 10 8\n")
    yolo = {"format": "yolo", "root": str(yolo_root)}
    cfg = tiny_config(data={"train": {**yolo, "split": "train"}, "val": {**yolo, "split": "val"}})
    with pytest.raises(DataValidationError) as info:
        build_datasets(cfg, with_masks=False)
    found = info.value.problems["train"]
    assert [(p.severity, p.line) for p in found] == [("warning", 1), ("warning", 2), ("error", None)]
    assert f"error: {yolo_root}: data.train has no box to train on: 3 usable images, none with" in str(info.value)
    assert info.value.problems["val"] == []


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(st.one_of(
    st.text(alphabet="0123456789 .-+eEnaif\t", max_size=30),
    st.tuples(st.integers(-2, 3), *[st.floats(allow_nan=True, allow_infinity=True, width=32)] * 4).map(
        lambda t: " ".join(str(v) for v in t)),
), max_size=6))
def test_random_yolo_labels_never_crash_conversion_or_validation(yolo_root: Path, lines: list[str]) -> None:
    """Any label text converts and validates into Problems and usable boxes, never an exception."""
    (yolo_root / "labels" / "train" / "a.txt").write_text("\n".join(lines))
    problems: list[Problem] = []
    dataset = yolo_to_coco(yolo_root, split="train", problems=problems)
    cleaned, found = validate_coco(dataset, yolo_root, str(yolo_root))
    assert all(p.file.endswith("a.txt") and p.line is not None for p in problems + found)
    for ann in cleaned["annotations"]:
        x, y, w, h = ann["bbox"]
        assert 0 <= x and 0 <= y and w > 0 and h > 0 and x + w <= 50 and y + h <= 40


@pytest.mark.parametrize("source_format", ["voc", "yolo"])
def test_data_convert_writes_coco_json_that_pycocotools_loads(
    voc_root: Path, yolo_root: Path, tmp_path: Path, source_format: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """labelenc data convert writes clean COCO JSON (no source keys) whose images resolve against SRC."""
    src = voc_root if source_format == "voc" else yolo_root
    out = tmp_path / "out" / "coco.json"
    argv = ["data", "convert", "--from", source_format, str(src), "--split", "train", "--out", str(out)]
    if source_format == "yolo":
        argv += ["--classes", "circle, square"]
    assert main(argv) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["annotations"] == str(out) and printed["images"] == str(src)
    expected = voc_to_coco(src, "train") if source_format == "voc" else yolo_to_coco(src, "train")
    coco = COCO(str(out))
    assert len(coco.imgs) == len(expected["images"]) and len(coco.anns) == len(expected["annotations"])
    assert printed["classes"] == [c["name"] for c in expected["categories"]]
    written = json.loads(out.read_text())
    assert not any(key in entry for key in SOURCE_KEYS for entry in written["images"] + written["annotations"])
    assert [a["bbox"] for a in written["annotations"]] == [a["bbox"] for a in expected["annotations"]]
    ds = CocoDetection(out, src)
    assert ds[0][0].shape[1:] == (expected["images"][0]["height"], expected["images"][0]["width"])


def test_data_convert_with_errors_exits_2_and_writes_nothing(
    voc_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A convert whose source has an error returns 2, lists it with its file and writes no JSON."""
    bad = voc_root / "Annotations" / "000001.xml"
    bad.write_text("<annotation>")
    out = tmp_path / "coco.json"
    assert main(["data", "convert", "--from", "voc", str(voc_root), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"error: {bad}: cannot parse" in err and not out.exists()


def test_write_coco_is_stable(voc_root: Path, tmp_path: Path) -> None:
    """Converting and writing twice gives byte-identical JSON."""
    first = write_coco(voc_to_coco(voc_root), tmp_path / "a.json").read_bytes()
    assert write_coco(voc_to_coco(voc_root), tmp_path / "b.json").read_bytes() == first


def _voc_split(root: Path, split: str, **extra) -> dict:
    return {"format": "voc", "root": str(root), "split": split, **extra}


def test_config_with_voc_and_yolo_sources_builds_datasets(voc_root: Path, yolo_root: Path, tiny_config) -> None:
    """VOC and YOLO sources build datasets; a VOC val split takes the training classes whatever it contains."""
    train, val = build_datasets(
        tiny_config(data={"train": _voc_split(voc_root, "train"), "val": _voc_split(voc_root, "val")}),
        with_masks=False)
    assert train.class_names == ["bird", "cat", "dog"] and val.label_to_category == train.label_to_category
    assert (len(train), len(val)) == (3, 1)
    assert val[0][1]["labels"].tolist() == [3]  # the val dog has the training label of dog
    yolo = {"format": "yolo", "root": str(yolo_root)}
    train, val = build_datasets(tiny_config(data={"train": {**yolo, "split": "train"},
                                                   "val": {**yolo, "split": "val"}}), with_masks=False)
    assert train.class_names == YOLO_CLASSES and (len(train), len(val)) == (3, 1)
    assert val[0][1]["labels"].tolist() == [2]


def test_val_split_classes_are_matched_by_name(voc_root: Path, yolo_root: Path, tiny_config) -> None:
    """A YOLO val split listing the classes in another order still gets the training labels (matched by name)."""
    yolo = {"format": "yolo", "root": str(yolo_root)}
    cfg = tiny_config(data={"train": {**yolo, "split": "train"},
                            "val": {**yolo, "split": "val", "class_names": ["square", "circle"]}})
    train, val = build_datasets(cfg, with_masks=False)
    assert val.label_to_category == train.label_to_category
    assert val[0][1]["labels"].tolist() == [1]  # index 1 of ["square", "circle"] is a circle
    cfg = tiny_config(data={"train": {**yolo, "split": "train"},
                            "val": {**yolo, "split": "val", "class_names": ["circle", "hexagon"]}})
    with pytest.raises(DataValidationError, match="'hexagon' is not among the training classes"):
        build_datasets(cfg, with_masks=False)


@pytest.mark.parametrize(
    "split, message",
    [
        ({"format": "voc"}, "format 'voc' needs root"),
        ({"format": "yolo", "root": "r", "annotations": "a.json"}, "format 'yolo' does not take annotations"),
        ({"annotations": "a.json"}, "format 'coco' needs images"),
        ({"annotations": "a.json", "images": "i", "class_names": ["a"]}, "format 'coco' does not take class_names"),
        ({"format": "voc", "root": "r", "class_names": ["a", "a"]}, "more than once"),
    ],
)
def test_split_config_names_the_keys_a_format_needs(tiny_config, split: dict, message: str) -> None:
    """A split config missing (or with a key foreign to) its format is a ConfigError naming the key."""
    with pytest.raises(ConfigError, match=message):
        tiny_config(data={"train": split})


def test_mask_detector_on_boxes_only_format_is_an_error(voc_root: Path, tiny_config) -> None:
    """Mask R-CNN on a VOC source stops at the data check, saying the format has no instance masks."""
    cfg = tiny_config("mask_rcnn", data={"train": _voc_split(voc_root, "train"), "val": _voc_split(voc_root, "val")})
    with pytest.raises(DataValidationError, match="format=voc has boxes only; model.family=mask_rcnn"):
        build_datasets(cfg, with_masks=True)


def test_training_on_a_voc_config_runs_and_evaluates(voc_root: Path, tiny_config) -> None:
    """runner.train trains 2 iterations on VOC sources and COCO-evaluates on the VOC val split."""
    cfg = tiny_config(data={"train": _voc_split(voc_root, "train"), "val": _voc_split(voc_root, "val")},
                      train={"base_iters": 2, "warmup_iters": 1})
    result = runner.train(cfg)
    assert result.weights.is_file()
    assert set(result.metrics["bbox"]) == {"AP", "AP50", "AP75", "APs", "APm", "APl"}
