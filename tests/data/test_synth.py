"""Tests of the embedded synthetic COCO dataset: determinism, COCO validity, mask/box/area consistency, content."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from labelenc.data.problems import DataError
from labelenc.data.synth import MIN_VISIBLE_AREA, SHAPES, generate_synthetic_dataset
from labelenc.errors import UserError

NUM_TRAIN, NUM_VAL, SIZE, MAX_OBJECTS = 40, 8, 128, 6


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path]]:
    """One mid-sized dataset with every shape class, shared by the content tests."""
    root = tmp_path_factory.mktemp("synth")
    paths = generate_synthetic_dataset(
        root, seed=0, num_train=NUM_TRAIN, num_val=NUM_VAL, image_size=SIZE, num_classes=len(SHAPES),
        max_objects=MAX_OBJECTS,
    )
    return root, paths


@pytest.fixture(scope="module")
def train(dataset: tuple[Path, dict[str, Path]]) -> COCO:
    return COCO(str(dataset[1]["train"]))


def _snapshot(root: Path) -> tuple[dict[str, bytes], dict[str, np.ndarray]]:
    """All JSON and PNG bytes of a generated dataset, plus the decoded pixels of the PNGs."""
    files = {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
    pixels = {name: np.asarray(Image.open(root / name)) for name in files if name.endswith(".png")}
    return files, pixels


def test_layout_and_return_value(dataset: tuple[Path, dict[str, Path]]) -> None:
    root, paths = dataset
    assert paths == {split: root / "annotations" / f"instances_{split}.json" for split in ("train", "val")}
    for split, count in (("train", NUM_TRAIN), ("val", NUM_VAL)):
        coco = COCO(str(paths[split]))
        assert len(coco.imgs) == count
        for info in coco.imgs.values():
            assert (info["width"], info["height"]) == (SIZE, SIZE)
            assert Path(info["file_name"]).name == info["file_name"]
            with Image.open(root / split / info["file_name"]) as image:
                assert (image.format, image.mode, image.size) == ("PNG", "RGB", (SIZE, SIZE))


def test_same_seed_is_byte_identical_and_other_seed_differs(tmp_path: Path) -> None:
    kwargs = dict(num_train=6, num_val=2, image_size=64, num_classes=8)
    generate_synthetic_dataset(tmp_path / "a", seed=7, **kwargs)
    generate_synthetic_dataset(tmp_path / "b", seed=7, **kwargs)
    generate_synthetic_dataset(tmp_path / "c", seed=8, **kwargs)
    files_a, pixels_a = _snapshot(tmp_path / "a")
    files_b, pixels_b = _snapshot(tmp_path / "b")
    files_c, pixels_c = _snapshot(tmp_path / "c")
    assert len(files_a) == 2 + 6 + 2
    assert files_a == files_b
    assert pixels_a.keys() == pixels_b.keys() == pixels_c.keys()
    assert all(np.array_equal(pixels_a[k], pixels_b[k]) for k in pixels_a)
    for name in ("annotations/instances_train.json", "annotations/instances_val.json"):
        assert files_a[name] != files_c[name]
    assert not any(np.array_equal(pixels_a[k], pixels_c[k]) for k in pixels_a)


def test_masks_boxes_and_areas_agree_with_pycocotools(train: COCO) -> None:
    assert train.anns
    for image_id in train.imgs:
        masks = []
        for ann in train.loadAnns(train.getAnnIds(imgIds=image_id)):
            mask = train.annToMask(ann)
            assert mask.shape == (SIZE, SIZE)
            assert mask.sum() == ann["area"] >= MIN_VISIBLE_AREA
            rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
            tight = [cols[0], rows[0], cols[-1] - cols[0] + 1, rows[-1] - rows[0] + 1]
            assert ann["bbox"] == [float(v) for v in tight]
            assert ann["iscrowd"] == 0
            masks.append(mask.astype(bool))
        # Occlusion is resolved: visible masks of one image never share a pixel.
        if masks:
            assert np.stack(masks).sum(axis=0).max() == 1


def test_masks_cover_flat_coloured_objects(dataset: tuple[Path, dict[str, Path]], train: COCO) -> None:
    """Each mask lies on one flat-coloured object (only sensor noise), so annotations match the drawn pixels."""
    root = dataset[0]
    checked = 0
    for ann in train.anns.values():
        if ann["area"] < 100:
            continue
        pixels = np.asarray(Image.open(root / "train" / train.imgs[ann["image_id"]]["file_name"]), dtype=np.float64)
        inside = pixels[train.annToMask(ann).astype(bool)]
        assert inside.std(axis=0).max() < 15.0
        checked += 1
    assert checked >= 20


def test_both_segmentation_formats_and_occlusion_occur(train: COCO) -> None:
    names = {cat["id"]: cat["name"] for cat in train.cats.values()}
    polygons = [ann for ann in train.anns.values() if isinstance(ann["segmentation"], list)]
    rles = [ann for ann in train.anns.values() if isinstance(ann["segmentation"], dict)]
    assert polygons and rles
    assert all(isinstance(ann["segmentation"]["counts"], str) for ann in rles)
    assert not {names[ann["category_id"]] for ann in polygons} & {"ellipse", "ring"}
    # A polygonal shape stored as RLE is one whose visible part was cut by an occluder.
    assert any(names[ann["category_id"]] not in ("ellipse", "ring") for ann in rles)


def test_empty_images_are_listed_and_object_counts_bounded(train: COCO) -> None:
    counts = [len(train.getAnnIds(imgIds=image_id)) for image_id in train.imgs]
    assert counts.count(0) == round(0.05 * NUM_TRAIN) > 0
    assert max(counts) <= MAX_OBJECTS
    assert len(set(counts)) >= 3


def test_categories_are_non_contiguous_shapes(dataset: tuple[Path, dict[str, Path]], train: COCO) -> None:
    ids = sorted(train.cats)
    assert [train.cats[i]["name"] for i in ids] == list(SHAPES)
    assert ids != list(range(1, len(ids) + 1)) and ids != list(range(len(ids)))
    assert {ann["category_id"] for ann in train.anns.values()} == set(ids)
    assert COCO(str(dataset[1]["val"])).cats == train.cats


def test_num_classes_selects_the_first_shapes(tmp_path: Path) -> None:
    paths = generate_synthetic_dataset(tmp_path, num_train=4, num_val=1, image_size=32, num_classes=2)
    coco = COCO(str(paths["train"]))
    assert [cat["name"] for cat in coco.loadCats(sorted(coco.cats))] == ["rectangle", "ellipse"]
    assert {ann["category_id"] for ann in coco.anns.values()} <= set(coco.cats)


def test_object_sizes_range_from_small_to_large(train: COCO) -> None:
    areas = np.array([ann["area"] for ann in train.anns.values()])
    sides = np.array([max(ann["bbox"][2:]) for ann in train.anns.values()])
    assert (areas < 16**2).any() and (areas > 48**2).any()
    assert sides.min() <= 12 and sides.max() >= 0.5 * SIZE


def test_min_object_size_removes_the_smallest_objects(tmp_path: Path) -> None:
    """Every intact (polygon) object spans at least min_object_size pixels; the default keeps smaller ones."""
    paths = generate_synthetic_dataset(tmp_path, num_train=40, num_val=1, image_size=64, min_object_size=20)
    anns = COCO(str(paths["train"])).anns.values()
    intact = [ann for ann in anns if isinstance(ann["segmentation"], list)]
    assert intact and min(max(ann["bbox"][2:]) for ann in intact) >= 19.5
    assert min(max(ann["bbox"][2:]) for ann in anns) < 20  # occluded ones may be cut smaller


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("seed", -1),
        ("num_train", 0),
        ("num_val", 0),
        ("num_train", 2.5),
        ("image_size", 16),
        ("num_classes", 0),
        ("num_classes", len(SHAPES) + 1),
        ("max_objects", 0),
        ("max_objects", True),
        ("min_object_size", 1),
        ("min_object_size", 90),
    ],
)
def test_bad_arguments_raise_a_user_error_naming_them(tmp_path: Path, name: str, value: object) -> None:
    """A bad argument is a DataError (a UserError and a ValueError), so `labelenc data synth` prints one line."""
    with pytest.raises(DataError, match=f"{name} must be an integer .*, got {value!r}") as info:
        generate_synthetic_dataset(tmp_path / "out", **{name: value})
    assert isinstance(info.value, UserError) and isinstance(info.value, ValueError)
    assert not (tmp_path / "out").exists()
