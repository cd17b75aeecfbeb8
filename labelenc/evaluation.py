"""COCO-style evaluation of torchvision detections, delegated to faster-coco-eval or pycocotools.

Both backends compute the same COCO metrics (faster-coco-eval is a C++ port of pycocotools' COCOeval): the
faster one is used when it is installed (``pip install 'labelenc[fast-eval]'``), unless the ``backend`` argument
or the environment variable ``LABELENC_COCO_BACKEND`` (``auto``, ``faster`` or ``pycocotools``) says otherwise.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import pycocotools.mask as mask_util
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import Tensor
from torchvision.ops import box_convert

from labelenc.data.coco import coco_from_dict
from labelenc.errors import UserError

__all__ = ["BACKENDS", "BACKEND_ENV", "CocoEvaluator", "IOU_TYPES", "METRICS", "resolve_backend"]

IOU_TYPES = ("bbox", "segm")
# Names of the first six entries of COCOeval.stats, in order.
METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
MASK_THRESHOLD = 0.5
NO_GROUND_TRUTH = -1.0  # COCOeval.stats entry with no ground truth to score (e.g. no large objects)
BACKEND_ENV = "LABELENC_COCO_BACKEND"
BACKENDS = ("auto", "faster", "pycocotools")  # auto: faster-coco-eval when installed, else pycocotools
FASTER = "faster-coco-eval"

logger = logging.getLogger(__name__)


def resolve_backend(backend: str | None = None) -> str:
    """The COCOeval implementation to use: ``"faster-coco-eval"`` or ``"pycocotools"``.

    ``backend`` is one of :data:`BACKENDS`; None reads ``LABELENC_COCO_BACKEND`` (unset or empty: ``pycocotools``,
    the reference, whose numbers earlier runs reported; faster-coco-eval agrees with it to within 1e-12, not bit for
    bit). ``auto`` takes faster-coco-eval when it is importable; ``faster`` without it installed is an error.
    """
    source = "backend"
    if backend is None:
        backend, source = os.environ.get(BACKEND_ENV, "").strip().lower() or "pycocotools", BACKEND_ENV
    if backend not in BACKENDS:
        raise UserError(f"{source}={backend!r} is not a COCO evaluation backend; allowed values are "
                        f"{', '.join(BACKENDS)}")
    installed = importlib.util.find_spec("faster_coco_eval") is not None
    if backend == "faster" and not installed:
        raise UserError(f"{source}=faster but faster-coco-eval is not installed: pip install 'labelenc[fast-eval]' "
                        "(or faster-coco-eval), or use pycocotools")
    return FASTER if backend == "faster" or (backend == "auto" and installed) else "pycocotools"


class CocoEvaluator:
    """Accumulates torchvision predictions and scores them with COCOeval (faster-coco-eval or pycocotools).

    Args:
        coco_gt: ground truth of the evaluated split.
        label_to_category: COCO category id of each model label (label ``i`` is category
            ``label_to_category[i]``); ``None`` marks the background label (torchvision's 0),
            whose detections are not scored.
        iou_types: subset of ``IOU_TYPES``; ``"segm"`` needs ``"masks"`` in the predictions.
        backend: the COCOeval implementation, one of :data:`BACKENDS` (see :func:`resolve_backend`); None: the
            ``LABELENC_COCO_BACKEND`` environment variable, else pycocotools. The metrics agree to within 1e-12;
            ``self.backend`` names the one chosen.

    ``update`` takes one torchvision eval-mode output per image, in original image
    coordinates: ``"boxes"`` [K, 4] xyxy, ``"scores"`` [K], ``"labels"`` [K] int64 and,
    for ``"segm"``, ``"masks"`` [K, 1, H, W] probabilities (binarised at 0.5).
    Converted detections are kept as plain COCO result dicts in ``self.results[iou_type]``
    and the seen image ids in ``self.image_ids``, so they can be gathered across processes.

    ``summarize`` returns ``{iou_type: {"AP", "AP50", "AP75", "APs", "APm", "APl"}}`` as
    floats in [0, 1], computed on the seen images only (images without detections count).
    A value is ``None`` where there is nothing to score: no ground truth in its bucket (e.g. no
    large objects; pycocotools' -1), or no image seen at all (an empty val split: every value).
    With no detection at all every value that has ground truth is 0.0.
    """

    def __init__(
        self,
        coco_gt: COCO,
        label_to_category: Sequence[int | None],
        iou_types: Sequence[str] = ("bbox",),
        backend: str | None = None,
    ) -> None:
        unknown = [t for t in iou_types if t not in IOU_TYPES]
        if unknown:
            raise ValueError(f"unknown iou_types {unknown}; allowed values are {IOU_TYPES}")
        missing = sorted(set(label_to_category) - set(coco_gt.getCatIds()) - {None})
        if missing:
            raise ValueError(f"label_to_category holds ids {missing} that are not categories of the ground truth")
        self.coco_gt = coco_gt
        self.label_to_category = [None if c is None else int(c) for c in label_to_category]
        self.iou_types = tuple(iou_types)
        self.backend = resolve_backend(backend)
        self.image_ids: set[int] = set()
        self.results: dict[str, list[dict[str, Any]]] = {t: [] for t in self.iou_types}

    def update(self, image_ids: Sequence[int], predictions: Sequence[dict[str, Tensor]]) -> None:
        """Convert one batch of per-image predictions to COCO result dicts and store them."""
        if len(image_ids) != len(predictions):
            raise ValueError(f"got {len(image_ids)} image ids for {len(predictions)} predictions")
        for image_id, prediction in zip(image_ids, predictions):
            image_id = int(image_id)
            self.image_ids.add(image_id)
            labels = prediction["labels"].tolist()
            if any(not 0 <= label < len(self.label_to_category) for label in labels):
                raise ValueError(f"labels must lie in [0, {len(self.label_to_category)}), got {labels}")
            keep = [i for i, label in enumerate(labels) if self.label_to_category[label] is not None]
            if not keep:
                continue
            scores = prediction["scores"].tolist()
            common = [
                {"image_id": image_id, "category_id": self.label_to_category[labels[i]], "score": scores[i]}
                for i in keep
            ]
            if "bbox" in self.iou_types:
                boxes = box_convert(prediction["boxes"][keep].detach().cpu(), "xyxy", "xywh").tolist()
                self.results["bbox"].extend(r | {"bbox": box} for r, box in zip(common, boxes))
            if "segm" in self.iou_types:
                self.results["segm"].extend(
                    r | {"segmentation": rle} for r, rle in zip(common, _encode_masks(prediction["masks"][keep]))
                )

    def state(self) -> dict[str, Any]:
        """Plain-data results of this process, to be gathered and passed to :meth:`merge` on the main one."""
        return {"image_ids": sorted(self.image_ids), "results": self.results}

    def merge(self, states: Sequence[dict[str, Any]]) -> None:
        """Replace this evaluator's results with the union of every process's :meth:`state`."""
        self.image_ids = {i for state in states for i in state["image_ids"]}
        self.results = {t: [r for state in states for r in state["results"][t]] for t in self.iou_types}

    def summarize(self) -> dict[str, dict[str, float | None]]:
        """Run COCOeval on the seen images for each iou type and return the six AP metrics (None: nothing to score)."""
        if not self.image_ids:
            logger.warning("no validation images: nothing was evaluated, every metric is None")
            return {iou_type: dict.fromkeys(METRICS) for iou_type in self.iou_types}
        if self.backend == FASTER:
            import faster_coco_eval

            # faster-coco-eval's own index of the same ground truth. Its evaluation adds keys (an RLE per mask) to
            # the annotation dicts it gets: hand it copies, so the dataset's own stay as they are.
            dataset = self.coco_gt.dataset
            gt = faster_coco_eval.COCO({**dataset, "annotations": [dict(a) for a in dataset.get("annotations", [])]},
                                       print_function=logger.debug)
            return {iou_type: self._summarize(iou_type, gt, faster_coco_eval.COCOeval_faster)
                    for iou_type in self.iou_types}
        return {iou_type: self._summarize(iou_type, self.coco_gt, COCOeval) for iou_type in self.iou_types}

    def _summarize(self, iou_type: str, coco_gt: Any, cocoeval: type) -> dict[str, float | None]:
        results = self.results[iou_type]
        with contextlib.redirect_stdout(io.StringIO()):
            # loadRes adds keys to the dicts it gets: hand it copies so self.results stays gatherable. pycocotools
            # cannot load an empty list: no detections are an empty result set, which scores 0 where there is
            # ground truth (faster-coco-eval loads it as one).
            if results or self.backend == FASTER:
                coco_dt = coco_gt.loadRes([dict(r) for r in results])
            else:
                coco_dt = coco_from_dict({"images": [], "annotations": [], "categories": []})
            coco_eval = cocoeval(coco_gt, coco_dt, iou_type)
            coco_eval.print_function = logger.debug  # faster-coco-eval's progress lines (pycocotools: unused)
            coco_eval.params.imgIds = sorted(self.image_ids)
            coco_eval.evaluate()
            coco_eval.accumulate()
        shown = f" ({FASTER})" if self.backend == FASTER else ""
        print(f"COCO {iou_type} evaluation on {len(self.image_ids)} images{shown}"
              + (":" if results else ": no detections"))
        coco_eval.print_function = print  # faster-coco-eval prints the table through it, as pycocotools does
        coco_eval.summarize()
        return {name: None if value == NO_GROUND_TRUTH else float(value)
                for name, value in zip(METRICS, coco_eval.stats)}


def _encode_masks(masks: Tensor) -> list[dict[str, Any]]:
    """Binarise [K, 1, H, W] mask probabilities and encode them as COCO RLEs with str counts."""
    binary = (masks[:, 0] > MASK_THRESHOLD).cpu().numpy().astype(np.uint8)
    rles = mask_util.encode(np.asfortranarray(binary.transpose(1, 2, 0)))
    for rle in rles:
        rle["counts"] = rle["counts"].decode("ascii")
    return rles
