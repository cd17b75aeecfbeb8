"""Tests of labelenc.data.coco: COCO JSON + image folder as torchvision detection targets, and its errors."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from labelenc.data.coco import CocoDetection, load_coco
from labelenc.data.loader import build_datasets
from labelenc.data.problems import DataError, DataValidationError
from labelenc.errors import UserError

H, W = 24, 32  # not square, so that a height/width mix-up shows
CATEGORIES = [  # listed out of id order; labels follow sorted ids: 3 -> 1, 7 -> 2, 42 -> 3
    {"id": 42, "name": "forty-two"},
    {"id": 7, "name": "seven"},
    {"id": 3, "name": "three"},
]


def _rle(rows: slice, cols: slice, compressed: bool) -> dict:
    """RLE of a rectangle mask, as a JSON-ready dict with compressed string or uncompressed list counts."""
    mask = np.zeros((H, W), dtype=np.uint8)
    mask[rows, cols] = 1
    if compressed:
        rle = mask_utils.encode(np.asfortranarray(mask))
        return {"size": [H, W], "counts": rle["counts"].decode("ascii")}
    flat = mask.flatten(order="F")  # COCO's uncompressed counts: column-major runs starting with zeros
    changes = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])))
    counts = np.diff(np.concatenate([[0], changes])).tolist()
    return {"size": [H, W], "counts": counts}


def _annotations() -> list[dict]:
    """Image 11: a polygon, an RLE and a crowd annotation; image 12: only a crowd one; image 13: none."""
    return [
        {"id": 101, "image_id": 11, "category_id": 7, "bbox": [2, 2, 18, 16], "area": 144.0, "iscrowd": 0,
         "segmentation": [[2, 2, 20, 2, 2, 18]]},
        {"id": 102, "image_id": 11, "category_id": 42, "bbox": [20, 10, 10, 10], "area": 100.0, "iscrowd": 0,
         "segmentation": _rle(slice(10, 20), slice(20, 30), compressed=True)},
        {"id": 103, "image_id": 11, "category_id": 3, "bbox": [0, 18, 12, 6], "area": 72.0, "iscrowd": 1,
         "segmentation": _rle(slice(18, 24), slice(0, 12), compressed=False)},
        {"id": 104, "image_id": 12, "category_id": 7, "bbox": [4, 4, 8, 8], "area": 64.0, "iscrowd": 1,
         "segmentation": _rle(slice(4, 12), slice(4, 12), compressed=False)},
    ]


def _write_split(root: Path, annotations: list[dict], categories: list[dict] = CATEGORIES) -> tuple[Path, Path]:
    """Write three random RGB PNGs and their COCO JSON under ``root``; return (json path, image folder)."""
    images_dir = root / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    images = []
    for image_id in (11, 12, 13):
        name = f"img_{image_id}.png"
        Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)).save(images_dir / name)
        images.append({"id": image_id, "file_name": name, "height": H, "width": W})
    path = root / "instances.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return path, images_dir


@pytest.fixture
def split(tmp_path: Path) -> tuple[Path, Path]:
    """The hand-written split of :func:`_annotations`."""
    return _write_split(tmp_path, _annotations())


def test_category_ids_map_to_contiguous_labels_and_back(split: tuple[Path, Path]) -> None:
    """Arbitrary category ids become labels 1..C in sorted-id order; label_to_category inverts it, label 0 is None."""
    ds = CocoDetection(*split)
    assert ds.num_classes == 3
    assert ds.category_to_label == {3: 1, 7: 2, 42: 3}
    assert ds.label_to_category == [None, 3, 7, 42]
    for category in (3, 7, 42):
        assert ds.label_to_category[ds.category_to_label[category]] == category
    assert ds.class_names == ["three", "seven", "forty-two"]


def test_crowd_left_out_and_images_without_annotations_kept(split: tuple[Path, Path]) -> None:
    """iscrowd=1 annotations are not targets; images with no (or only crowd) annotations stay as negatives."""
    ds = CocoDetection(*split, with_masks=True)
    assert len(ds) == 3
    targets = {int(ds[i][1]["image_id"]): ds[i][1] for i in range(len(ds))}
    assert sorted(targets) == [11, 12, 13]
    assert targets[11]["labels"].tolist() == [2, 3]  # categories 7 and 42; the crowd category-3 region is absent
    for image_id in (12, 13):
        assert targets[image_id]["boxes"].shape == (0, 4)
        assert targets[image_id]["labels"].shape == (0,)
        assert targets[image_id]["masks"].shape == (0, H, W)


def _check_against_pycocotools(ds: CocoDetection, annotation_file: Path, image_dir: Path) -> None:
    """Every item's pixels, xyxy boxes, labels and masks equal what pycocotools and PIL give independently."""
    reference = COCO(str(annotation_file))
    for index in range(len(ds)):
        image, target = ds[index]
        image_id = int(target["image_id"])
        info = reference.imgs[image_id]
        pixels = np.array(Image.open(image_dir / info["file_name"]).convert("RGB"))
        assert image.dtype == torch.float32 and image.shape == (3, info["height"], info["width"])
        assert 0 <= image.min() and image.max() <= 1
        assert torch.equal((image * 255).round().to(torch.uint8), torch.from_numpy(pixels).permute(2, 0, 1))
        anns = reference.loadAnns(reference.getAnnIds(imgIds=[image_id], iscrowd=False))
        expected_boxes = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)],
                                      dtype=torch.float32).reshape(-1, 4)
        torch.testing.assert_close(target["boxes"].as_subclass(torch.Tensor), expected_boxes, rtol=0, atol=1e-5)
        assert target["labels"].tolist() == [ds.category_to_label[a["category_id"]] for a in anns]
        expected_masks = np.stack([reference.annToMask(a) for a in anns]) if anns else np.zeros((0,) + pixels.shape[:2])
        assert target["masks"].dtype == torch.uint8
        assert np.array_equal(target["masks"].numpy(), expected_masks)


def test_boxes_masks_and_pixels_match_pycocotools(split: tuple[Path, Path]) -> None:
    """Polygon and RLE masks decode as pycocotools' annToMask, bbox xywh becomes xyxy, pixels are PNG / 255."""
    ds = CocoDetection(*split, with_masks=True)
    segmentations = [a["segmentation"] for a in _annotations() if not a["iscrowd"]]
    assert isinstance(segmentations[0], list) and isinstance(segmentations[1], dict)  # both kinds are exercised
    _check_against_pycocotools(ds, *split)
    mask = ds[0][1]["masks"][1]  # the RLE rectangle rows 10..19, cols 20..29
    assert mask.sum() == 100 and mask[10:20, 20:30].all()


def test_synthetic_split_matches_pycocotools(synth_root: Path) -> None:
    """On the synthetic set (polygons, occlusion RLEs, empty images) every item equals pycocotools' decoding."""
    annotation_file, image_dir = synth_root / "annotations/instances_train.json", synth_root / "train"
    ds = CocoDetection(annotation_file, image_dir, with_masks=True)
    assert len(ds) == len(json.loads(annotation_file.read_text())["images"])
    _check_against_pycocotools(ds, annotation_file, image_dir)


def test_masks_only_when_asked(split: tuple[Path, Path]) -> None:
    """Without with_masks the target has exactly boxes, labels and image_id."""
    _, target = CocoDetection(*split)[0]
    assert set(target) == {"boxes", "labels", "image_id"}


@pytest.mark.parametrize(
    "content, expected",
    [
        (None, "not found"),
        ('{"images": [', "not readable JSON"),
        ('{"annotations": [], "categories": []}', "'images'"),
        ('{"images": [], "annotations": {}, "categories": []}', "'annotations'"),
        ("[1, 2]", "JSON object"),
    ],
    ids=["missing", "broken-json", "no-images", "annotations-not-list", "not-object"],
)
def test_load_coco_errors_name_the_file(tmp_path: Path, content: str | None, expected: str) -> None:
    """load_coco raises DataError (a UserError) whose message names the file and what is wrong with it."""
    path = tmp_path / "instances_bad.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(DataError) as info:
        load_coco(path)
    assert isinstance(info.value, UserError)
    assert str(path) in str(info.value) and expected in str(info.value)


def test_constructor_validates_and_refuses_an_unknown_category(tmp_path: Path) -> None:
    """An annotation whose category id is not among the categories stops the constructor, naming file and ids."""
    annotations = _annotations()
    annotations[1] = {**annotations[1], "id": 7777, "category_id": 999}
    path, images = _write_split(tmp_path, annotations)
    with pytest.raises(DataValidationError) as info:
        CocoDetection(path, images)
    assert f"error: {path}: image 11, annotation 7777: unknown category id 999" in str(info.value)


def test_constructor_holds_the_cleaned_annotations(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Boxes past the border are clipped and empty ones dropped, each logged with its annotation id."""
    annotations = _annotations()
    annotations[0] = {**annotations[0], "bbox": [-6, 2, 26, 40]}  # clipped to [0, 2, 20, 22]
    annotations[1] = {**annotations[1], "bbox": [20, 10, 0, 10]}  # zero width: dropped
    path, images = _write_split(tmp_path, annotations)
    ds = CocoDetection(path, images, with_masks=True)
    target = ds[0][1]
    assert target["boxes"].as_subclass(torch.Tensor).tolist() == [[0.0, 2.0, 20.0, float(H)]]
    assert target["labels"].tolist() == [2] and target["masks"].shape == (1, H, W)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any(m.startswith(f"warning: {path}: image 11, annotation 101: box [-6, 2, 26, 40] extends")
               for m in warnings)
    assert any(f"annotation 102: box [20, 10, 0, 10] has zero or negative width" in m for m in warnings)


@pytest.mark.parametrize("damage", ["garbage", "missing"])
def test_unreadable_image_is_refused_by_the_constructor(split: tuple[Path, Path], damage: str) -> None:
    """A corrupt or missing image file is found by the constructor's header check, naming its path."""
    path, images = split
    image_path = images / "img_12.png"
    if damage == "garbage":
        image_path.write_bytes(b"this is not a png")
    else:
        image_path.unlink()
    with pytest.raises(DataValidationError, match=f"image 12: .*{re.escape(str(image_path))}"):
        CocoDetection(path, images)


def test_truncated_image_names_the_path_when_loaded(split: tuple[Path, Path]) -> None:
    """A truncated image has a valid header: the dataset builds, and decoding it is a DataError naming it."""
    path, images = split
    image_path = images / "img_12.png"
    data = image_path.read_bytes()
    image_path.write_bytes(data[: len(data) // 2])
    ds = CocoDetection(path, images)
    assert isinstance(ds[0][0], torch.Tensor)  # other images still load
    with pytest.raises(DataError, match=re.escape(f"cannot read image {image_path} (image id 12)")):
        ds[1]


def test_missing_image_folder_is_an_error(split: tuple[Path, Path], tmp_path: Path) -> None:
    """An image folder that does not exist is reported at construction, naming it."""
    missing = tmp_path / "no_such_folder"
    with pytest.raises(DataError, match="no_such_folder"):
        CocoDetection(split[0], missing)


def test_val_split_with_other_categories_is_refused(synth_root: Path, tmp_path: Path, tiny_config) -> None:
    """build_datasets shares the training category mapping and refuses a val split with different categories."""
    train, val = build_datasets(tiny_config(), with_masks=False)
    assert val.label_to_category == train.label_to_category
    dataset = json.loads((synth_root / "annotations/instances_val.json").read_text())
    dataset["categories"] = dataset["categories"][:-1] + [{"id": 12345, "name": "other"}]
    dataset["annotations"] = []
    other = tmp_path / "instances_val_other.json"
    other.write_text(json.dumps(dataset))
    cfg = tiny_config(data={"val": {"annotations": str(other), "images": str(synth_root / "val")}})
    with pytest.raises(DataError, match="instances_val_other.json.*12345"):
        build_datasets(cfg, with_masks=False)
