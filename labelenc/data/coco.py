"""COCO-format detection dataset yielding torchvision ``(image, target)`` pairs."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from pycocotools.coco import COCO
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from labelenc.data.formats import read_coco_json
from labelenc.data.problems import DataError
from labelenc.data.validate import read_validated_coco, require_image_folder


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
    maps back (``None`` at index 0, the background). Crowd annotations are left out of training targets, as
    detectron2 and the COCO evaluation do (they are ignore regions). Images without annotations are kept as negatives.
    Each item is ``(image float[3, H, W] in [0, 1], {"boxes" xyxy, "labels", "image_id"[, "masks" uint8[K, H, W]]})``
    as ``tv_tensors``, so that ``torchvision.transforms.v2`` transforms boxes and masks with the image.
    The constructor reads an annotation file and validates it as a run does (image headers, every annotation; see
    :mod:`labelenc.data.validate`): errors raise :class:`~labelenc.data.problems.DataValidationError`, warnings
    are logged, and the dataset holds the cleaned annotations. :meth:`from_dataset` takes an in-memory dict that is
    validated and cleaned already, such as the one ``build_datasets`` makes.
    """

    def __init__(
        self,
        annotations: str | Path,
        images: str | Path,
        with_masks: bool = False,
        categories: list[int] | None = None,
    ) -> None:
        dataset = read_validated_coco(annotations, images, need_masks=with_masks)
        self._setup(coco_from_dict(dataset), Path(annotations), Path(images), with_masks, categories)

    @classmethod
    def from_dataset(
        cls,
        dataset: dict,
        images: str | Path,
        source: str | Path,
        with_masks: bool = False,
        categories: list[int] | None = None,
    ) -> CocoDetection:
        """The split of a COCO dict that :func:`~labelenc.data.validate.validate_coco` cleaned (e.g. from VOC / YOLO).

        ``source`` (the annotation file or dataset folder it came from) names the split in messages.
        """
        self = cls.__new__(cls)
        self._setup(coco_from_dict(dataset), Path(source), require_image_folder(images, source), with_masks,
                    categories)
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
        """The target of one image from its validated annotations (boxes inside the image, known categories)."""
        anns = [a for a in self.coco.imgToAnns.get(image_id, []) if not a["iscrowd"]]
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        target = {
            "boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(height, width)),
            "labels": torch.tensor([self.category_to_label[a["category_id"]] for a in anns], dtype=torch.int64),
            "image_id": torch.tensor(image_id),
        }
        if self.with_masks:
            masks = [self.coco.annToMask(a) for a in anns]
            data = np.stack(masks) if masks else np.zeros((0, height, width), dtype=np.uint8)
            target["masks"] = tv_tensors.Mask(torch.from_numpy(data))
        return target

    def __getitem__(self, index: int) -> tuple[tv_tensors.Image, dict[str, torch.Tensor]]:
        image_id = self.image_ids[index]
        pil = self.load_image(image_id)
        image = v2.functional.to_dtype(v2.functional.pil_to_tensor(pil), torch.float32, scale=True)
        return tv_tensors.Image(image), self.load_target(image_id, pil.height, pil.width)
