"""Tests of labelenc.data.validate: every data problem reported with file and ids, cleaned data, `data check`."""

from __future__ import annotations

import copy
import json
import logging
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from pycocotools import mask as mask_utils

from labelenc import runner
from labelenc.cli import main
from labelenc.config import save_config
from labelenc.data.coco import CocoDetection
from labelenc.data.loader import SeededStream, build_datasets, train_transforms
from labelenc.data.problems import DataValidationError, Problem, summarize
from labelenc.data.validate import MIN_BOX_SIZE, validate_coco
from labelenc.errors import UserError

W, H = 32, 24  # not square, so that a width / height mix-up shows


def _dataset() -> dict:
    """Three images (the third a negative), categories 1 and 5, three good annotations 10, 11, 12."""
    return {
        "images": [{"id": i, "file_name": f"img_{i}.png", "width": W, "height": H} for i in (1, 2, 3)],
        "categories": [{"id": 1, "name": "a"}, {"id": 5, "name": "b"}],
        "annotations": [
            {"id": 10, "image_id": 1, "category_id": 1, "bbox": [2, 3, 10, 8], "area": 80, "iscrowd": 0},
            {"id": 11, "image_id": 1, "category_id": 5, "bbox": [12, 4, 6, 6], "area": 36, "iscrowd": 0},
            {"id": 12, "image_id": 2, "category_id": 5, "bbox": [0, 0, W, H], "area": W * H, "iscrowd": 0},
        ],
    }


def _write_images(folder: Path, sizes: dict[str, tuple[int, int]]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name, (width, height) in sizes.items():
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(folder / name)


@pytest.fixture
def split(tmp_path: Path) -> tuple[dict, Path, Path]:
    """(dataset dict, image folder, annotation file) of :func:`_dataset`, images written, JSON written."""
    images = tmp_path / "images"
    _write_images(images, {f"img_{i}.png": (W, H) for i in (1, 2, 3)})
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(_dataset()))
    return _dataset(), images, path


def _ann(dataset: dict, ann_id: int) -> dict | None:
    return next((a for a in dataset["annotations"] if a["id"] == ann_id), None)


def _set_ann(ann_id: int, **fields) -> Callable[[dict, Path], None]:
    def mutate(dataset: dict, images: Path) -> None:
        _ann(dataset, ann_id).update(fields)
    return mutate


def _duplicate_image_id(dataset: dict, images: Path) -> None:
    dataset["images"][2]["id"] = 2


def _damage(kind: str) -> Callable[[dict, Path], None]:
    def mutate(dataset: dict, images: Path) -> None:
        path = images / "img_2.png"
        if kind == "missing":
            path.unlink()
        elif kind == "garbage":
            path.write_bytes(b"not an image at all")
        else:  # truncated: a valid header, half the pixel data
            data = path.read_bytes()
            path.write_bytes(data[: len(data) // 2])
    return mutate


def _recorded_width(dataset: dict, images: Path) -> None:
    dataset["images"][1]["width"] = W + 1


# (mutation, severity, image id, annotation id, message part, what the cleaned dict holds for ann 10 / image 2)
CASES = {
    "box-partly-outside": (_set_ann(10, bbox=[-4, 3, 10, 30]), "warning", 1, 10, "clipped", [0, 3, 6, H - 3]),
    "zero-width": (_set_ann(10, bbox=[2, 3, 0, 8]), "warning", 1, 10, "zero or negative", None),
    "negative-height": (_set_ann(10, bbox=[2, 3, 5, -1]), "warning", 1, 10, "zero or negative", None),
    "box-outside": (_set_ann(10, bbox=[W + 1, 3, 5, 5]), "warning", 1, 10, "outside the 32x24 image", None),
    "box-sliver-inside": (_set_ann(10, bbox=[W - 0.001, 3, 5, 5]), "warning", 1, 10, f"less than {MIN_BOX_SIZE}",
                          None),
    "unknown-category": (_set_ann(10, category_id=99), "error", 1, 10, "unknown category id 99", None),
    "bbox-three-numbers": (_set_ann(10, bbox=[1, 2, 3]), "error", 1, 10, "malformed bbox", None),
    "bbox-nan": (_set_ann(10, bbox=[1, math.nan, 3, 4]), "error", 1, 10, "malformed bbox", None),
    "bbox-string": (_set_ann(10, bbox=[1, "2", 3, 4]), "error", 1, 10, "malformed bbox", None),
    "missing-image-id": (_set_ann(10, image_id=777), "error", None, 10, "image id 777, which is not among", None),
    "bad-iscrowd": (_set_ann(10, iscrowd=2), "error", 1, 10, "iscrowd must be 0 or 1", None),
    "duplicate-annotation-id": (_set_ann(11, id=10), "error", 1, 10, "duplicate annotation id 10",
                                [2, 3, 10, 8]),
    "duplicate-image-id": (_duplicate_image_id, "error", 2, None, "duplicate image id 2", "image-2-kept"),
    "missing-image-file": (_damage("missing"), "error", 2, None, "image file not found", "image-2-dropped"),
    "unreadable-image-file": (_damage("garbage"), "error", 2, None, "cannot read image", "image-2-dropped"),
    "truncated-image-file": (_damage("truncated"), "error", 2, None, "truncated or corrupt image",
                             "image-2-dropped"),
    "recorded-size-differs": (_recorded_width, "error", 2, None, "recorded size 33x24", "image-2-dropped"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_each_problem_is_reported_with_file_ids_and_severity(split: tuple[dict, Path, Path], case: str) -> None:
    """One problem per kind, naming the annotation file and ids, the right severity; the cleaned copy is usable."""
    mutate, severity, image_id, ann_id, message, cleaned_state = CASES[case]
    dataset, images, path = split
    mutate(dataset, images)
    original = copy.deepcopy(dataset)
    cleaned, problems = validate_coco(dataset, images, str(path), check_pixels=True)
    assert dataset == original or case == "bbox-nan"  # the input is left alone (nan != nan)
    assert len(problems) == 1, problems
    problem = problems[0]
    assert (problem.severity, problem.file, problem.image_id, problem.annotation_id) == (
        severity, str(path), image_id, ann_id)
    assert message in problem.message
    line = str(problem)
    assert "\n" not in line and line.startswith(f"{severity}: {path}: ") and message in line
    if ann_id is not None:
        assert f"annotation {ann_id}" in line
    kept = {a["id"]: a["bbox"] for a in cleaned["annotations"]}
    image_ids = [i["id"] for i in cleaned["images"]]
    if cleaned_state == "image-2-dropped":
        assert image_ids == [1, 3] and 12 not in kept and kept[10] == [2, 3, 10, 8]
    elif cleaned_state == "image-2-kept":
        assert image_ids == [1, 2] and kept[12] == [0, 0, W, H]
    else:
        assert image_ids == [1, 2, 3] and kept.get(10) == cleaned_state and kept[12] == [0, 0, W, H]
    for ann in cleaned["annotations"]:  # every kept box lies inside its image with a positive size
        x, y, w, h = ann["bbox"]
        assert 0 <= x and 0 <= y and w > 0 and h > 0 and x + w <= W and y + h <= H


def test_truncated_image_is_found_only_when_pixels_are_checked(split: tuple[dict, Path, Path]) -> None:
    """A truncated file has a valid header: the run-start check (headers) passes it, `data check` decodes it."""
    dataset, images, path = split
    _damage("truncated")(dataset, images)
    assert validate_coco(dataset, images, str(path), check_pixels=False)[1] == []
    assert [p.image_id for p in validate_coco(dataset, images, str(path), check_pixels=True)[1]] == [2]


def test_clean_data_passes_unchanged_and_negatives_are_kept(split: tuple[dict, Path, Path]) -> None:
    """Clean data has no problems; the image without annotations stays as a negative with empty targets."""
    dataset, images, path = split
    cleaned, problems = validate_coco(dataset, images, str(path), check_pixels=True)
    assert problems == [] and cleaned == dataset
    ds = CocoDetection.from_dataset(cleaned, images, str(path))
    assert len(ds) == 3 and ds[2][1]["boxes"].shape == (0, 4)


def test_missing_area_and_iscrowd_are_filled_and_clipped_area_follows_the_box(split: tuple[dict, Path, Path]) -> None:
    """COCO evaluation needs area and iscrowd: missing ones are filled in; a clipped maskless box gets its new area."""
    dataset, images, path = split
    del dataset["annotations"][1]["area"], dataset["annotations"][1]["iscrowd"]
    dataset["annotations"][0]["bbox"] = [-4, 3, 10, 8]
    cleaned, _ = validate_coco(dataset, images, str(path))
    assert (_ann(cleaned, 11)["area"], _ann(cleaned, 11)["iscrowd"]) == (36, 0)
    assert _ann(cleaned, 10)["area"] == 6 * 8


def _rle(rows: slice, cols: slice, height: int = H, width: int = W) -> dict:
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[rows, cols] = 1
    rle = mask_utils.encode(np.asfortranarray(mask))
    return {"size": [height, width], "counts": rle["counts"].decode("ascii")}


MASK_CASES = {
    "none": (None, "error", "no instance mask"),
    "rle-other-size": (_rle(slice(3, 11), slice(2, 12), H + 1, W), "error", "RLE mask size [25, 32]"),
    "rle-short-counts": ({"size": [H, W], "counts": [5, 10]}, "error", "do not cover the 32x24 image"),
    "rle-garbage-string": ({"size": [H, W], "counts": "\x7f\x7f"}, "error", "do not cover"),
    "polygon-two-points": ([[2, 3, 12, 3]], "warning", "no usable polygon"),
    "one-bad-polygon": ([[2, 3, 12, 3, 12, 11], [1, 1]], "warning", "dropped 1 invalid polygon"),
}


@pytest.mark.parametrize("case", list(MASK_CASES))
def test_mask_detectors_need_decodable_segmentations(split: tuple[dict, Path, Path], case: str) -> None:
    """With masks needed, an unusable segmentation is a problem of annotation 10; the cleaned masks all decode."""
    segmentation, severity, message = MASK_CASES[case]
    dataset, images, path = split
    for ann in dataset["annotations"]:
        ann["segmentation"] = _rle(slice(3, 11), slice(2, 12))
    dataset["annotations"][0]["segmentation"] = segmentation
    if segmentation is None:
        del dataset["annotations"][0]["segmentation"]
    cleaned, problems = validate_coco(dataset, images, str(path), need_masks=True)
    assert [(p.severity, p.annotation_id) for p in problems] == [(severity, 10)] and message in problems[0].message
    ds = CocoDetection.from_dataset(cleaned, images, str(path), with_masks=True)
    masks = ds[0][1]["masks"]
    assert masks.shape[1:] == (H, W)
    if case == "one-bad-polygon":
        assert _ann(cleaned, 10)["segmentation"] == [[2, 3, 12, 3, 12, 11]] and masks.shape[0] == 2
    else:
        assert _ann(cleaned, 10) is None and masks.shape[0] == 1


def test_problem_line_shows_line_number_and_summary_counts_per_split() -> None:
    """A Problem with a line prints file:line; summarize counts errors and warnings overall and per split."""
    problem = Problem("error", "labels/a.txt", 4, None, "bad", line=3)
    assert str(problem) == "error: labels/a.txt:3: image 4: bad"
    warning = Problem("warning", "x.json", 1, 7, "clipped")
    assert str(warning) == "warning: x.json: image 1, annotation 7: clipped"
    assert summarize({"train": [problem, warning, warning], "val": []}) == (
        "1 error, 2 warnings (train: 1 error, 2 warnings; val: no problems)")


def _config(tiny_config, tmp_path: Path, train: Path, val: Path, images: Path) -> Path:
    """A tiny config YAML whose splits are the given annotation files (both on ``images``)."""
    cfg = tiny_config(data={"train": {"annotations": str(train), "images": str(images)},
                            "val": {"annotations": str(val), "images": str(images)}})
    path = tmp_path / "config.yaml"
    save_config(cfg, path)
    return path


def _write_variant(path: Path, mutate: Callable[[dict, Path], None] | None, images: Path) -> Path:
    dataset = _dataset()
    if mutate is not None:
        mutate(dataset, images)
    path.write_text(json.dumps(dataset))
    return path


@pytest.mark.parametrize(
    "train_case, val_case, args, code, text",
    [
        (None, None, [], 0, "data check passed: 0 errors, 0 warnings"),
        ("box-partly-outside", None, [], 0, "warning: {train}: image 1, annotation 10: box"),
        ("box-partly-outside", None, ["--strict"], 2, "strict: warnings are fatal"),
        ("box-partly-outside", None, ["data.strict=true"], 2, "1 warning (train: 1 warning; val: no problems)"),
        ("unknown-category", "missing-image-id", [], 2, "2 errors, 0 warnings (train: 1 error; val: 1 error)"),
        ("truncated-image-file", None, [], 2, "truncated or corrupt image"),
    ],
    ids=["clean", "warning", "strict-flag", "strict-config", "errors-in-both-splits", "truncated"],
)
def test_data_check_exit_codes_and_full_list(
    split: tuple[dict, Path, Path], tiny_config, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    train_case: str | None, val_case: str | None, args: list[str], code: int, text: str,
) -> None:
    """`labelenc data check` exits 0 on clean data or warnings only, 2 on errors or (strict) warnings, listing all."""
    _, images, _ = split
    train = _write_variant(tmp_path / "train.json", CASES[train_case][0] if train_case else None, images)
    val = _write_variant(tmp_path / "val.json", CASES[val_case][0] if val_case else None, images)
    config = _config(tiny_config, tmp_path, train, val, images)
    assert main(["data", "check", str(config), *args]) == code
    captured = capsys.readouterr()
    output = captured.out if code == 0 else captured.err
    assert text.format(train=train) in output
    if code == 2:
        assert sum("labelenc: error:" in line for line in output.splitlines()) == 1 and "Traceback" not in output
        for case, path in ((train_case, train), (val_case, val)):
            if case:
                _, _, image_id, ann_id, message, _ = CASES[case]
                listed = [line for line in output.splitlines() if str(path) in line and message in line]
                assert len(listed) == 1 and (ann_id is None or f"annotation {ann_id}" in listed[0])
                assert image_id is None or f"image {image_id}" in listed[0]


def _no_annotations(dataset: dict, images: Path) -> None:
    dataset["annotations"] = []


def _every_box_outside(dataset: dict, images: Path) -> None:
    for ann in dataset["annotations"]:
        ann["bbox"] = [W + 1, 0, 4, 4]


def _only_crowd(dataset: dict, images: Path) -> None:
    for ann in dataset["annotations"]:
        ann["iscrowd"] = 1


def _no_images(dataset: dict, images: Path) -> None:
    dataset["images"], dataset["annotations"] = [], []


@pytest.mark.parametrize("mutate", [_no_annotations, _every_box_outside, _only_crowd, _no_images])
def test_training_split_without_a_box_fails_the_check_but_such_a_val_split_passes(
    split: tuple[dict, Path, Path], tiny_config, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    mutate: Callable[[dict, Path], None],
) -> None:
    """A training split with no box to train on is an error naming it (not a run that learns nothing); as a val
    split the same data passes the check."""
    _, images, _ = split
    empty = _write_variant(tmp_path / "empty.json", mutate, images)
    clean = _write_variant(tmp_path / "clean.json", None, images)
    assert main(["data", "check", str(_config(tiny_config, tmp_path, empty, clean, images))]) == 2
    err = capsys.readouterr().err
    usable = 0 if mutate is _no_images else 3
    assert f"error: {empty}: data.train has no box to train on: {usable} usable images, none with a usable box" in err
    assert "val: no problems" in err
    assert main(["data", "check", str(_config(tiny_config, tmp_path, clean, empty, images))]) == 0
    assert "data check passed" in capsys.readouterr().out


def test_val_split_with_other_category_ids_fails_the_check_as_it_fails_a_run(
    split: tuple[dict, Path, Path], tiny_config, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`data check` refuses val category ids that differ from the training ones, naming the val file and them."""
    _, images, _ = split

    def renumber(dataset: dict, images: Path) -> None:
        dataset["categories"][1]["id"] = 6
        for ann in dataset["annotations"]:
            ann["category_id"] = 6 if ann["category_id"] == 5 else ann["category_id"]

    train = _write_variant(tmp_path / "train.json", None, images)
    val = _write_variant(tmp_path / "val.json", renumber, images)
    config = _config(tiny_config, tmp_path, train, val, images)
    expected = (f"error: {val}: data.val's category ids differ from data.train's (only in data.val: 6 'b'; "
                f"only in data.train: 5 'b')")
    assert main(["data", "check", str(config)]) == 2
    err = capsys.readouterr().err
    assert expected in err and "1 error, 0 warnings (train: no problems; val: 1 error)" in err
    assert main(["train", str(config)]) == 2
    assert expected in capsys.readouterr().err


def test_run_stops_before_training_with_the_full_list(
    split: tuple[dict, Path, Path], tiny_config, tmp_path: Path
) -> None:
    """runner.train on data with errors raises DataValidationError listing all of them; no checkpoint is written."""
    _, images, _ = split
    train = tmp_path / "train.json"
    dataset = _dataset()
    dataset["annotations"][0]["category_id"] = 99
    dataset["annotations"][1]["bbox"] = [1, 2]
    train.write_text(json.dumps(dataset))
    cfg = tiny_config(data={"train": {"annotations": str(train), "images": str(images)},
                            "val": {"annotations": str(train), "images": str(images)}})
    with pytest.raises(DataValidationError) as info:
        runner.train(cfg)
    assert isinstance(info.value, UserError)
    message = str(info.value)
    assert "4 errors" in message and "annotation 10: unknown category id 99" in message
    assert "annotation 11: malformed bbox" in message
    assert [p.annotation_id for p in info.value.problems["train"]] == [10, 11]
    output = Path(cfg.output_dir)
    assert not list(output.glob("*.pth")) and not (output / "metrics.jsonl").exists()


def test_warnings_are_logged_and_training_data_is_clipped(
    split: tuple[dict, Path, Path], tiny_config, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """build_datasets logs one line per warning and a summary, and the datasets hold the clipped boxes."""
    _, images, _ = split
    train = _write_variant(tmp_path / "train.json", CASES["box-partly-outside"][0], images)
    val = _write_variant(tmp_path / "val.json", CASES["zero-width"][0], images)
    cfg = tiny_config(data={"train": {"annotations": str(train), "images": str(images)},
                            "val": {"annotations": str(val), "images": str(images)}})
    with caplog.at_level(logging.WARNING, logger="labelenc.data.problems"):
        train_set, val_set = build_datasets(cfg, with_masks=False)
    lines = [r.getMessage() for r in caplog.records]
    assert any(line.startswith(f"warning: {train}: image 1, annotation 10: box") for line in lines)
    assert any(line.startswith(f"warning: {val}: image 1, annotation 10: box") for line in lines)
    assert "data check: 0 errors, 2 warnings (train: 1 warning; val: 1 warning)" in lines
    boxes = train_set[0][1]["boxes"].as_subclass(torch.Tensor)
    torch.testing.assert_close(boxes[0], torch.tensor([0.0, 3, 6, H]))
    assert val_set[0][1]["boxes"].shape == (1, 4)  # annotation 10 dropped, 11 kept
    with pytest.raises(DataValidationError, match="strict"):
        build_datasets(cfg.model_copy(update={"data": cfg.data.model_copy(update={"strict": True})}), False)


# ------------------------------------------------------------------------------------------- property tests

PROPERTY_SIZES = {1: (20, 12), 2: (7, 30)}  # image id -> (width, height)


@pytest.fixture(scope="module")
def property_images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two small PNGs for the property tests (module-scoped: hypothesis reuses them across examples)."""
    folder = tmp_path_factory.mktemp("property")
    _write_images(folder, {f"{i}.png": size for i, size in PROPERTY_SIZES.items()})
    return folder


_coordinate = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(-40, 40),
    st.integers(-50, 50),
    st.sampled_from([0, 0.0, -0.0, 1e-9, 1e-3, 7, 12, 20, 30, 1e308, -1e308, 10**400]),
)
_bbox = st.one_of(
    st.lists(_coordinate, min_size=4, max_size=4),
    st.lists(_coordinate, max_size=6),
    st.none(),
    st.text(max_size=4),
)
_annotation = st.fixed_dictionaries({
    "image_id": st.sampled_from([1, 2, 2, 1, 3]),
    "category_id": st.sampled_from([1, 5, 5, 1, 99]),
    "bbox": _bbox,
    "iscrowd": st.sampled_from([0, 0, 0, 1]),
})


def _reference_box(bbox: object, width: int, height: int) -> list[float] | str:
    """What the spec says happens to a box: 'error', 'dropped', or the box clipped to the image."""
    if not (isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(v, (int, float)) for v in bbox)):
        return "error"
    try:
        x, y, w, h = (float(v) for v in bbox)
    except OverflowError:  # an integer beyond the float range
        return "error"
    if not all(math.isfinite(v) for v in (x, y, w, h)):
        return "error"
    if w <= 0 or h <= 0:
        return "dropped"
    x1, y1 = np.clip(x, 0, width), np.clip(y, 0, height)
    x2, y2 = np.clip(x + w, 0, width), np.clip(y + h, 0, height)
    if x2 - x1 < MIN_BOX_SIZE or y2 - y1 < MIN_BOX_SIZE:
        return "dropped"
    return [float(x1), float(y1), float(x2 - x1), float(y2 - y1)]


@settings(max_examples=150, deadline=None)
@given(annotations=st.lists(_annotation, max_size=8), flip_seed=st.integers(0, 3))
def test_random_and_degenerate_boxes_never_crash_and_yield_only_valid_targets(
    property_images: Path, annotations: list[dict], flip_seed: int
) -> None:
    """Any boxes (NaN, inf, negative, huge, zero-size, outside, malformed) validate, load and augment without
    an exception; each one is kept as the spec's clipped box or named in a problem; every target box has
    x2 > x1, y2 > y1 inside its image."""
    dataset = {
        "images": [{"id": i, "file_name": f"{i}.png", "width": w, "height": h} for i, (w, h) in PROPERTY_SIZES.items()],
        "categories": [{"id": 1, "name": "a"}, {"id": 5, "name": "b"}],
        "annotations": [{"id": n, **a} for n, a in enumerate(annotations, start=100)],
    }
    cleaned, problems = validate_coco(dataset, property_images, "prop.json")
    kept = {a["id"]: a for a in cleaned["annotations"]}
    named = {p.annotation_id for p in problems}
    assert all(p.file == "prop.json" for p in problems)
    for ann in dataset["annotations"]:
        if ann["image_id"] == 3 or ann["category_id"] == 99:
            assert ann["id"] in named and ann["id"] not in kept
            continue
        expected = _reference_box(ann["bbox"], *PROPERTY_SIZES[ann["image_id"]])
        if isinstance(expected, str):
            assert ann["id"] in named and ann["id"] not in kept
            assert any(p.severity == ("error" if expected == "error" else "warning") for p in problems
                       if p.annotation_id == ann["id"])
        else:
            np.testing.assert_allclose(kept[ann["id"]]["bbox"], expected, rtol=1e-12, atol=1e-9)
    ds = CocoDetection.from_dataset(cleaned, property_images, "prop.json")
    stream = SeededStream(ds, train_transforms(0.5), seed=flip_seed)
    for position in range(len(ds)):
        image, target = stream[position]
        height, width = image.shape[-2:]
        boxes = target["boxes"].as_subclass(torch.Tensor)
        image_id = int(target["image_id"])
        assert len(boxes) == sum(1 for a in kept.values() if a["image_id"] == image_id and not a["iscrowd"])
        assert boxes.isfinite().all() and (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
        assert (boxes[:, 0::2] >= 0).all() and (boxes[:, 0::2] <= width).all()
        assert (boxes[:, 1::2] >= 0).all() and (boxes[:, 1::2] <= height).all()
        assert set(target["labels"].tolist()) <= {1, 2}


@pytest.mark.parametrize("command", ["convert", "check"])
def test_data_subcommand_help_has_examples(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    """`labelenc data convert|check --help` exits 0 with examples of that very subcommand."""
    with pytest.raises(SystemExit) as info:
        main(["data", command, "--help"])
    assert info.value.code == 0
    assert f"labelenc data {command} " in capsys.readouterr().out.split("examples:")[1]
