"""Tests for labelenc.evaluation: COCO scoring of torchvision-style predictions (pycocotools or faster-coco-eval)."""

from __future__ import annotations

import copy
import importlib.util
import itertools
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from pycocotools.coco import COCO

from labelenc.data.coco import coco_from_dict, load_coco
from labelenc.errors import UserError
from labelenc.evaluation import BACKEND_ENV, METRICS, CocoEvaluator, resolve_backend

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


# ------------------------------------------------------------------------------------------ evaluation backends


def _noisy_predictions(coco: COCO, label_to_category: tuple, seed: int) -> dict[int, dict[str, torch.Tensor]]:
    """Imperfect detections of every image: jittered boxes and shifted masks of most objects, some with the wrong
    label, duplicates, random false positives, scores with ties; some images without any detection."""
    rng = np.random.default_rng(seed)
    labels_of = {c: i for i, c in enumerate(label_to_category) if c is not None}
    predictions = {}
    for image_id in coco.getImgIds():
        info = coco.imgs[image_id]
        height, width = info["height"], info["width"]
        boxes, scores, labels, masks = [], [], [], []
        for ann in coco.loadAnns(coco.getAnnIds(imgIds=[image_id], iscrowd=False)):
            for _ in range(rng.integers(0, 3)):  # missed, found, or found twice
                x, y, w, h = ann["bbox"]
                dx, dy = rng.normal(0, 0.15, 2) * (w, h)
                boxes.append([x + dx, y + dy, x + dx + w * rng.uniform(0.8, 1.2), y + dy + h * rng.uniform(0.8, 1.2)])
                label = labels_of[ann["category_id"]] if rng.random() < 0.8 else int(rng.choice(list(labels_of.values())))
                labels.append(label)
                scores.append(float(rng.choice([0.3, 0.5, 0.9])) if rng.random() < 0.5 else float(rng.random()))
                masks.append(np.roll(coco.annToMask(ann), (round(dy), round(dx)), axis=(0, 1)))
        for _ in range(rng.integers(0, 3)):  # false positives
            x, y = rng.uniform(0, width - 4), rng.uniform(0, height - 4)
            w, h = rng.uniform(2, width - x), rng.uniform(2, height - y)
            boxes.append([x, y, x + w, y + h])
            labels.append(int(rng.choice(list(labels_of.values()))))
            scores.append(float(rng.random()))
            mask = np.zeros((height, width), dtype=np.uint8)
            mask[int(y):int(y + h), int(x):int(x + w)] = 1
            masks.append(mask)
        if not boxes or rng.random() < 0.1:
            predictions[image_id] = _no_detections() | {"masks": torch.zeros(0, 1, height, width)}
            continue
        predictions[image_id] = {
            "boxes": torch.tensor(boxes, dtype=torch.float32).clamp(min=0),
            "scores": torch.tensor(scores),
            "labels": torch.tensor(labels, dtype=torch.int64),
            "masks": torch.from_numpy(np.stack(masks)).float()[:, None] * rng.uniform(0.55, 1.0),
        }
    return predictions


def _scores_by_backend(dataset: dict, label_to_category: tuple, seed: int) -> dict[str, dict]:
    stats = {}
    for backend in ("pycocotools", "faster"):
        coco = coco_from_dict(copy.deepcopy(dataset))  # a fresh index each: neither sees what the other changed
        predictions = _noisy_predictions(coco, label_to_category, seed)
        evaluator = CocoEvaluator(coco, label_to_category, iou_types=("bbox", "segm"), backend=backend)
        evaluator.update(list(predictions), list(predictions.values()))
        stats[backend] = evaluator.summarize()
    return stats


# pycocotools computes each precision as tp / (tp + fp + np.spacing(1)), faster-coco-eval (C++) as tp / (tp + fp):
# with tp = 1, fp = 0 that is 0.9999999999999998 against 1.0. Every precision therefore differs by at most
# np.spacing(1) = 2.2e-16 (relative, on values in [0, 1]), and so does every AP, a mean of them, up to the rounding
# of the sum: a few units in the 16th digit. Matching, recall, score order and the None buckets are exactly equal.
BACKEND_TOLERANCE = 1e-12


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("split", ["fixture", "synthetic-train", "synthetic-val"])
def test_faster_coco_eval_gives_the_same_metrics_as_pycocotools(
    split: str, seed: int, coco_gt: COCO, synth_root: Path
) -> None:
    """bbox and segm, on crowd regions, every size range, images without annotations and without detections,
    duplicate and mislabelled detections and tied scores: the same metrics to the last bits (see above)."""
    pytest.importorskip("faster_coco_eval")
    if split == "fixture":
        dataset, label_to_category = coco_gt.dataset, LABEL_TO_CATEGORY
    else:
        synth = load_coco(synth_root / f"annotations/instances_{split.split('-')[1]}.json")
        dataset, label_to_category = synth.dataset, (None, *sorted(synth.getCatIds()))
    stats = _scores_by_backend(dataset, label_to_category, seed)
    faster, reference = stats["faster"], stats["pycocotools"]
    assert faster.keys() == reference.keys() == {"bbox", "segm"}
    for iou_type, expected in reference.items():
        scored = {k: v for k, v in expected.items() if v is not None}
        assert {k: v for k, v in faster[iou_type].items() if v is not None} == pytest.approx(
            scored, rel=0, abs=BACKEND_TOLERANCE), iou_type
        assert faster[iou_type].keys() == expected.keys()  # and the None ones (no ground truth) are the same
    values = [v for iou_type in reference.values() for v in iou_type.values() if v is not None]
    assert any(0.0 < v < 1.0 for v in values), stats  # detections that score neither nothing nor everything


def test_backend_choice(monkeypatch: pytest.MonkeyPatch, coco_gt: COCO) -> None:
    """pycocotools by default (the reference); ``auto`` takes faster-coco-eval when installed; the environment
    variable or the argument decides."""
    installed = importlib.util.find_spec("faster_coco_eval") is not None
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    assert resolve_backend() == "pycocotools"
    assert resolve_backend("auto") == ("faster-coco-eval" if installed else "pycocotools")
    monkeypatch.setenv(BACKEND_ENV, "auto")
    assert CocoEvaluator(coco_gt, LABEL_TO_CATEGORY).backend == resolve_backend("auto")
    monkeypatch.setenv(BACKEND_ENV, "pycocotools")
    assert CocoEvaluator(coco_gt, LABEL_TO_CATEGORY).backend == "pycocotools"
    monkeypatch.setenv(BACKEND_ENV, "fastest")
    with pytest.raises(UserError, match="LABELENC_COCO_BACKEND='fastest'.*auto, faster, pycocotools"):
        CocoEvaluator(coco_gt, LABEL_TO_CATEGORY)
    assert resolve_backend("pycocotools") == "pycocotools"  # the argument wins over the environment

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "faster_coco_eval" else real_find_spec(name, *a))
    monkeypatch.setenv(BACKEND_ENV, "auto")
    assert resolve_backend() == "pycocotools"  # auto, without it installed
    with pytest.raises(UserError, match=r"faster-coco-eval is not installed: pip install 'labelenc\[fast-eval\]'"):
        resolve_backend("faster")


def test_faster_backend_leaves_the_ground_truth_as_it_was(coco_gt: COCO) -> None:
    pytest.importorskip("faster_coco_eval")
    coco = coco_from_dict(copy.deepcopy(coco_gt.dataset))
    before = copy.deepcopy(coco.dataset)
    evaluator = CocoEvaluator(coco, LABEL_TO_CATEGORY, iou_types=("bbox", "segm"), backend="faster")
    evaluator.update(coco.getImgIds(), [_perfect_prediction(coco, i) for i in coco.getImgIds()])
    assert evaluator.summarize()["segm"]["AP"] == pytest.approx(1.0)
    assert coco.dataset == before
