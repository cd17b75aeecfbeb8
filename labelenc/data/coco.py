"""COCO-format detection dataset yielding torchvision ``(image, target)`` pairs."""

from __future__ import annotations

import contextlib
import io
import json
import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from pycocotools.coco import COCO
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from labelenc.errors import UserError

logger = logging.getLogger(__name__)


class DataError(UserError, ValueError):
    """A dataset file or annotation that cannot be used; the message names the file and annotation."""


def read_coco_json(path: str | Path) -> dict:
    """The dict of a COCO annotation file with its ``images``, ``annotations`` and ``categories`` lists."""
    path = Path(path)
    try:
        dataset = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"annotation file not found: {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"annotation file {path} is not readable JSON: {err}") from None
    if not isinstance(dataset, dict):
        raise DataError(f"annotation file {path} must hold a JSON object, got {type(dataset).__name__}")
    for key in ("images", "annotations", "categories"):
        if not isinstance(dataset.get(key), list):
            raise DataError(f"annotation file {path} has no '{key}' list")
    return dataset


def coco_from_dict(dataset: dict) -> COCO:
    """A pycocotools ``COCO`` index of an in-memory dataset dict, without pycocotools' prints."""
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def load_coco(path: str | Path) -> COCO:
    """Load a COCO annotation file without pycocotools' prints, failing with the file named."""
    return coco_from_dict(read_coco_json(path))


class CocoDetection(Dataset):
    """Images and annotations of one COCO-format split, as torchvision detection targets.

    Category ids (arbitrary) map to contiguous labels ``1..C`` in sorted-id order; ``label_to_category[label]``
    maps back (``None`` at index 0, the background). Crowd annotations are left out of training targets, as detectron2 and
    the COCO evaluation do (they are ignore regions). Images without annotations are kept as negatives.
    Each item is ``(image float[3, H, W] in [0, 1], {"boxes" xyxy, "labels", "image_id"[, "masks" uint8[K, H, W]]})``
    as ``tv_tensors``, so that ``torchvision.transforms.v2`` transforms boxes and masks with the image.
    The constructor reads an annotation file as it is; :meth:`from_dataset` takes an in-memory dict, such as the
    validated and cleaned one ``build_datasets`` makes (see :mod:`labelenc.data.validate`).
    """

    def __init__(
        self,
        annotations: str | Path,
        images: str | Path,
        with_masks: bool = False,
        categories: list[int] | None = None,
    ) -> None:
        self._setup(load_coco(annotations), Path(annotations), Path(images), with_masks, categories)

    @classmethod
    def from_dataset(
        cls,
        dataset: dict,
        images: str | Path,
        source: str | Path,
        with_masks: bool = False,
        categories: list[int] | None = None,
    ) -> CocoDetection:
        """The split of an in-memory COCO dict (e.g. validated and cleaned, or converted from VOC / YOLO).

        ``source`` (the annotation file or dataset folder it came from) names the split in messages.
        """
        self = cls.__new__(cls)
        self._setup(coco_from_dict(dataset), Path(source), Path(images), with_masks, categories)
        return self

    def _setup(
        self, coco: COCO, source: Path, images: Path, with_masks: bool, categories: list[int] | None
    ) -> None:
        self.annotation_file = source
        self.image_dir = images
        self.coco = coco
        self.with_masks = with_masks
        self.image_ids = sorted(self.coco.imgs)
        self.categories = self.coco.loadCats(sorted(self.coco.cats))
        ids = [c["id"] for c in self.categories]
        if categories is not None and categories != ids:
            raise DataError(
                f"{self.annotation_file}: categories {ids} differ from the training set's {categories}"
            )
        self.label_to_category: list[int | None] = [None] + ids
        self.category_to_label = {cid: i + 1 for i, cid in enumerate(ids)}
        self.class_names = [c["name"] for c in self.categories]
        if not self.image_dir.is_dir():
            raise DataError(f"image folder not found: {self.image_dir} (named with {self.annotation_file})")

    def __len__(self) -> int:
        return len(self.image_ids)

    @property
    def num_classes(self) -> int:
        return len(self.categories)

    def load_image(self, image_id: int) -> Image.Image:
        info = self.coco.imgs[image_id]
        path = self.image_dir / info["file_name"]
        try:
            with Image.open(path) as img:
                return img.convert("RGB")
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
            raise DataError(f"cannot read image {path} (image id {image_id}): {err}") from None

    def load_target(self, image_id: int, height: int, width: int) -> dict[str, torch.Tensor]:
        anns = [a for a in self.coco.imgToAnns.get(image_id, []) if not a.get("iscrowd", 0)]
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
        try:
            labels = torch.tensor([self.category_to_label[a["category_id"]] for a in anns], dtype=torch.int64)
        except KeyError as err:
            bad = next(a for a in anns if a["category_id"] not in self.category_to_label)
            raise DataError(
                f"{self.annotation_file}: annotation {bad.get('id')} of image {image_id} has unknown category id {err}"
            ) from None
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1]) & boxes.isfinite().all(dim=1)
        if not keep.all():
            dropped = [a.get("id") for a, k in zip(anns, keep.tolist()) if not k]
            logger.warning("%s: image %s: dropped annotations %s with empty boxes", self.annotation_file, image_id, dropped)
        target = {
            "boxes": tv_tensors.BoundingBoxes(boxes[keep], format="XYXY", canvas_size=(height, width)),
            "labels": labels[keep],
            "image_id": torch.tensor(image_id),
        }
        if self.with_masks:
            masks = [self.coco.annToMask(a) for a, k in zip(anns, keep.tolist()) if k]
            data = np.stack(masks) if masks else np.zeros((0, height, width), dtype=np.uint8)
            target["masks"] = tv_tensors.Mask(torch.from_numpy(data))
        return target

    def __getitem__(self, index: int) -> tuple[tv_tensors.Image, dict[str, torch.Tensor]]:
        image_id = self.image_ids[index]
        pil = self.load_image(image_id)
        image = v2.functional.to_dtype(v2.functional.pil_to_tensor(pil), torch.float32, scale=True)
        return tv_tensors.Image(image), self.load_target(image_id, pil.height, pil.width)
