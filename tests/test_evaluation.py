"""Tests for labelenc.evaluation: pycocotools scoring of torchvision-style predictions."""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from pycocotools.coco import COCO

from labelenc.data.coco import load_coco
from labelenc.evaluation import METRICS, CocoEvaluator

SIZE = 160
LABEL_TO_CATEGORY = (3, 7, 11)
CATEGORY_TO_LABEL = {c: i for i, c in enumerate(LABEL_TO_CATEGORY)}


def _triangle(x: float, y: float, w: float, h: float) -> dict:
    """Non-crowd annotation whose polygon is a right triangle spanning the box."""
    return {"bbox": [x, y, w, h], "area": w * h / 2, "iscrowd": 0,
            "segmentation": [[x, y, x + w, y, x, y + h]]}


def _rectangle_rle(x: int, y: int, w: int, h: int, *, crowd: bool) -> dict:
    """Annotation whose mask is the box: uncompressed RLE if crowd (as in COCO), compressed RLE otherwise."""
    mask = np.zeros((SIZE, SIZE), dtype=np.uint8)
    mask[y:y + h, x:x + w] = 1
    if crowd:
        runs = [len(list(run)) for _, run in itertools.groupby(mask.flatten(order="F"))]
        rle = {"size": [SIZE, SIZE], "counts": runs}  # runs alternate 0s and 1s; the first pixel is 0
    else:
        rle = mask_util.encode(np.asfortranarray(mask))
        rle["counts"] = rle["counts"].decode("ascii")
    return {"bbox": [x, y, w, h], "area": w * h, "iscrowd": int(crowd), "segmentation": rle}


@pytest.fixture(scope="module")
def coco_gt(tmp_path_factory: pytest.TempPathFactory) -> COCO:
    """Three images (the last without annotations), categories 3/7/11, every size range, one crowd."""
    annotations = [
        (1, 3, _triangle(10, 10, 20, 20)),  # small (area 200)
        (1, 7, _triangle(40, 40, 60, 60)),  # medium (area 1800)
        (1, 11, _rectangle_rle(110, 110, 40, 40, crowd=True)),
        (2, 11, _triangle(5, 10, 150, 140)),  # large (area 10500)
        (2, 3, _rectangle_rle(120, 120, 30, 30, crowd=False)),  # small (area 900)
        (2, 7, _triangle(100, 5, 50, 50)),  # medium (area 1250)
    ]
    dataset = {
        "images": [{"id": i, "width": SIZE, "height": SIZE, "file_name": f"{i}.jpg"} for i in (1, 2, 3)],
        "categories": [{"id": c, "name": f"c{c}"} for c in LABEL_TO_CATEGORY],
        "annotations": [
            {"id": n, "image_id": image_id, "category_id": category_id, **fields}
            for n, (image_id, category_id, fields) in enumerate(annotations, start=1)
        ],
    }
    path = tmp_path_factory.mktemp("coco") / "instances.json"
    path.write_text(json.dumps(dataset))
    return load_coco(path)


def _perfect_prediction(coco: COCO, image_id: int) -> dict[str, torch.Tensor]:
    """Ground truth of one image as a torchvision eval output: xyxy boxes, score 1, 0-based labels, masks.

    Mask probabilities are 0.6 on the object and 0.4 elsewhere: only a 0.5 threshold recovers the ground truth.
    """
    anns = coco.loadAnns(coco.getAnnIds(imgIds=[image_id], iscrowd=False))
    if not anns:
        return _no_detections()
    boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32)
    boxes[:, 2:] += boxes[:, :2]
    masks = torch.stack([torch.from_numpy(coco.annToMask(a)).float() for a in anns])[:, None]
    return {
        "boxes": boxes,
        "scores": torch.ones(len(anns)),
        "labels": torch.tensor([CATEGORY_TO_LABEL[a["category_id"]] for a in anns], dtype=torch.int64),
        "masks": 0.4 + 0.2 * masks,
    }


def _no_detections() -> dict[str, torch.Tensor]:
    return {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64),
            "masks": torch.zeros(0, 1, SIZE, SIZE)}


def _evaluate(coco: COCO, predictions: dict[int, dict[str, torch.Tensor]]) -> dict[str, dict[str, float]]:
    evaluator = CocoEvaluator(coco, LABEL_TO_CATEGORY, iou_types=("bbox", "segm"))
    evaluator.update(list(predictions), list(predictions.values()))
    return evaluator.summarize()


def test_ground_truth_as_predictions_scores_one(coco_gt: COCO) -> None:
    evaluator = CocoEvaluator(coco_gt, LABEL_TO_CATEGORY, iou_types=("bbox", "segm"))
    image_ids = coco_gt.getImgIds()
    evaluator.update(image_ids, [_perfect_prediction(coco_gt, i) for i in image_ids])
    stats = evaluator.summarize()
    assert stats.keys() == {"bbox", "segm"}
    for iou_type_stats in stats.values():
        assert iou_type_stats == pytest.approx(dict.fromkeys(METRICS, 1.0))
    # Stored results are plain, JSON-ready COCO dicts (xywh boxes, str RLE counts), untouched by loadRes.
    first_gt = coco_gt.loadAnns(coco_gt.getAnnIds(imgIds=[1]))[0]
    assert evaluator.results["bbox"][0] == {"image_id": 1, "category_id": 3, "score": 1.0, "bbox": first_gt["bbox"]}
    assert evaluator.image_ids == {1, 2, 3}
    json.dumps(evaluator.results)


def test_only_seen_images_count_including_those_without_detections(coco_gt: COCO) -> None:
    assert _evaluate(coco_gt, {2: _perfect_prediction(coco_gt, 2)})["bbox"]["AP"] == pytest.approx(1.0)
    assert _evaluate(coco_gt, {1: _no_detections(), 2: _perfect_prediction(coco_gt, 2)})["bbox"]["AP"] < 1.0


def _shuffle_labels(p: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return p | {"labels": (p["labels"] + 1) % len(LABEL_TO_CATEGORY)}


def _shift_boxes(p: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return p | {"boxes": p["boxes"] + 12.0, "masks": p["masks"].roll(shifts=(12, 12), dims=(2, 3))}


@pytest.mark.parametrize("perturb", [_shuffle_labels, _shift_boxes])
def test_perturbed_predictions_score_lower(
    coco_gt: COCO, perturb: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]
) -> None:
    stats = _evaluate(coco_gt, {i: perturb(_perfect_prediction(coco_gt, i)) for i in coco_gt.getImgIds()})
    assert stats["bbox"]["AP"] < 1.0
    assert stats["segm"]["AP"] < 1.0


def test_no_detections_gives_zero(coco_gt: COCO) -> None:
    stats = _evaluate(coco_gt, {i: _no_detections() for i in coco_gt.getImgIds()})
    assert stats == {t: dict.fromkeys(METRICS, 0.0) for t in ("bbox", "segm")}


@pytest.mark.parametrize(("prediction", "value"), [(_perfect_prediction, 1.0), (lambda coco, i: _no_detections(), 0.0)],
                         ids=["perfect", "no-detections"])
def test_a_size_bucket_without_ground_truth_is_none(
    coco_gt: COCO, prediction: Callable[[COCO, int], dict[str, torch.Tensor]], value: float
) -> None:
    """Image 1 has no large object: APl is None (JSON null), not pycocotools' -1; the other values are real."""
    stats = _evaluate(coco_gt, {1: prediction(coco_gt, 1)})
    expected = dict.fromkeys(METRICS, value) | {"APl": None}
    assert stats == {"bbox": pytest.approx(expected), "segm": pytest.approx(expected)}
    assert '"APl": null' in json.dumps(stats)


def test_empty_val_split_gives_none_and_a_warning(coco_gt: COCO, caplog: pytest.LogCaptureFixture) -> None:
    """With no image evaluated every metric is None and a warning says so."""
    stats = CocoEvaluator(coco_gt, LABEL_TO_CATEGORY, iou_types=("bbox", "segm")).summarize()
    assert stats == {t: dict.fromkeys(METRICS) for t in ("bbox", "segm")}
    assert [r.getMessage() for r in caplog.records] == [
        "no validation images: nothing was evaluated, every metric is None"]


@pytest.mark.parametrize(("label", "expected_ap"), [(CATEGORY_TO_LABEL[7], 0.5), (CATEGORY_TO_LABEL[3], 0.0)])
def test_labels_are_mapped_to_category_ids(coco_gt: COCO, label: int, expected_ap: float) -> None:
    # Image 1 has non-crowd ground truth for categories 3 and 7; the one detection sits on the category-7 box,
    # so AP (mean over categories 3 and 7) is 0.5 only if label is translated to category 7.
    evaluator = CocoEvaluator(coco_gt, LABEL_TO_CATEGORY)
    evaluator.update([1], [{"boxes": torch.tensor([[40.0, 40.0, 100.0, 100.0]]), "scores": torch.tensor([0.9]),
                            "labels": torch.tensor([label])}])
    assert evaluator.summarize()["bbox"]["AP"] == pytest.approx(expected_ap)


def test_invalid_configuration_raises(coco_gt: COCO) -> None:
    with pytest.raises(ValueError, match="bbox"):
        CocoEvaluator(coco_gt, LABEL_TO_CATEGORY, iou_types=("keypoints",))
    with pytest.raises(ValueError, match="5"):
        CocoEvaluator(coco_gt, (3, 5, 11))
    with pytest.raises(ValueError, match="labels"):
        CocoEvaluator(coco_gt, LABEL_TO_CATEGORY).update([1], [_no_detections() | {"labels": torch.tensor([3])}])
