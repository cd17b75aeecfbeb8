"""Dataset validation before any training: every problem with its file and annotation id, and a cleaned copy.

:func:`validate_coco` checks one COCO dict against its image folder and returns a cleaned copy that the
training loop can always use, with the list of :class:`~labelenc.data.problems.Problem` found:

errors (fatal: the run does not start)
    unknown category id; annotation of an image id that is not in ``images``; malformed bbox (not 4 finite
    numbers); duplicate image, annotation or category ids; image entry without an integer id or a file name;
    missing or unreadable image file; truncated image (only when pixels are checked); recorded width / height
    different from the file's; ``iscrowd`` other than 0 / 1; with instance masks needed, an annotation without a
    usable segmentation.
warnings (fatal with ``--strict`` / ``data.strict``)
    box partly outside the image by more than half a pixel (clipped); box with zero or negative width or
    height (dropped); box outside the image or thinner than :data:`MIN_BOX_SIZE` inside it (dropped); invalid
    polygons of a mask (dropped).

Images without annotations are kept as negatives. :func:`check_data` reads and validates both splits of a
config (COCO, VOC or YOLO sources) and checks what a run needs of them together: a training split with at least
one box to train on, and a val split with the training split's category ids. :func:`report_problems` logs the
warnings or raises :class:`~labelenc.data.problems.DataValidationError` with the full list.
:func:`read_validated_coco` does the same for one annotation file.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image

from labelenc.data.formats import read_coco_json, voc_to_coco, yolo_to_coco
from labelenc.data.problems import DataError, Problem, plural, raise_or_log

if TYPE_CHECKING:
    from labelenc.config import Config, SplitConfig

__all__ = [
    "MIN_BOX_SIZE",
    "CheckedSplit",
    "check_data",
    "read_validated_coco",
    "report_problems",
    "require_image_folder",
    "validate_coco",
]

MIN_BOX_SIZE = 0.01  # px: a box narrower or lower than this inside the image is empty
CLIP_TOLERANCE = 0.5  # px: boxes past the image border by at most this are clipped without a warning


# ------------------------------------------------------------------------------------------------ one COCO dict


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer too large for a float
        return False


def _inspect_image(path: Path, check_pixels: bool) -> tuple[tuple[int, int] | None, str | None]:
    """(width, height) from the header, or the reason the file cannot be used; decodes it all if asked."""
    if not path.is_file():
        return None, f"image file not found: {path}"
    size = None
    try:
        with Image.open(path) as img:
            size = img.size
            if check_pixels:
                img.load()
    except Exception as err:  # noqa: BLE001 - PIL raises OSError, ValueError, SyntaxError, DecompressionBombError...
        if size is not None:
            return None, f"truncated or corrupt image {path}: {err}"
        return None, f"cannot read image {path}: {err}"
    return size, None


def _inspect_images(paths: list[Path], check_pixels: bool) -> list[tuple[tuple[int, int] | None, str | None]]:
    if len(paths) < 32:
        return [_inspect_image(p, check_pixels) for p in paths]
    workers = min(16, 2 * (os.cpu_count() or 1))  # file I/O and PIL's decoders release the GIL
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(lambda p: _inspect_image(p, check_pixels), paths, chunksize=64))


def _rle_string_total(counts: str) -> int | None:
    """Sum of the run lengths of a compressed COCO RLE string (pycocotools' rleFrString), None if malformed."""
    runs: list[int] = []
    p = 0
    while p < len(counts):
        x, k, more = 0, 0, True
        while more:
            if p >= len(counts):
                return None
            c = ord(counts[p]) - 48
            if not 0 <= c < 64:
                return None
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)
        if len(runs) > 2:
            x += runs[-2]
        if x < 0:
            return None
        runs.append(x)
    return sum(runs)


def _check_segmentation(segmentation: object, width: int, height: int) -> tuple[object, str | None, str | None]:
    """(segmentation to keep, error, warning) for a mask pycocotools can decode at this image size."""
    if isinstance(segmentation, list):
        def usable(poly: object) -> bool:
            return (isinstance(poly, list) and len(poly) >= 6 and len(poly) % 2 == 0
                    and all(_is_number(v) for v in poly)
                    and all(-width <= v <= 2 * width for v in poly[0::2])
                    and all(-height <= v <= 2 * height for v in poly[1::2]))

        polygons = [poly for poly in segmentation if usable(poly)]
        if len(polygons) == len(segmentation) and polygons:
            return segmentation, None, None
        bad = len(segmentation) - len(polygons)
        if not polygons:
            return None, None, "no usable polygon (each needs at least 3 finite points near the image); dropped"
        return polygons, None, f"dropped {plural(bad, 'invalid polygon')} of its mask"
    if isinstance(segmentation, dict):
        size, counts = segmentation.get("size"), segmentation.get("counts")
        if not (isinstance(size, list) and list(size) == [height, width]):
            return None, f"RLE mask size {size!r} is not the image's [height, width] [{height}, {width}]", None
        if isinstance(counts, list) and all(_is_int(c) and c >= 0 for c in counts):
            total = sum(counts)
        elif isinstance(counts, str):
            total = _rle_string_total(counts)
        else:
            total = None
        if total != width * height:
            return None, f"RLE mask counts do not cover the {width}x{height} image", None
        return segmentation, None, None
    return None, "no instance mask (segmentation), which a mask detector needs", None


def validate_coco(
    dataset: dict,
    image_dir: str | Path,
    source: str,
    check_pixels: bool = False,
    need_masks: bool = False,
) -> tuple[dict, list[Problem]]:
    """Check a COCO dict against its images; return a cleaned copy and every problem found (see module doc).

    The cleaned copy holds only usable entries: boxes clipped to their image, empty ones dropped, entries with
    errors left out, ``area`` and ``iscrowd`` filled in where missing. Image sizes come from the file headers;
    ``check_pixels`` decodes every image as well, to find truncated files. ``need_masks`` requires a segmentation
    that pycocotools can decode on every annotation. ``source`` (the annotation file) is the file named in
    problems of entries that do not carry their own ``source`` (converted VOC / YOLO entries do).
    """
    image_dir = Path(image_dir)
    problems: list[Problem] = []

    def report(severity: str, entry: dict | None, message: str, image_id: object = None,
               annotation_id: object = None) -> None:
        entry = entry if isinstance(entry, dict) else {}
        line = entry.get("source_line")
        if entry.get("source_object") is not None:
            message = f"object {entry['source_object']}: {message}"
        problems.append(Problem(
            severity, str(entry.get("source", source)),
            image_id if _is_int(image_id) else None, annotation_id if _is_int(annotation_id) else None,
            message, line if _is_int(line) else None,
        ))

    categories, category_ids = [], set()
    for index, category in enumerate(dataset.get("categories", [])):
        cid = category.get("id") if isinstance(category, dict) else None
        if not _is_int(cid):
            report("error", None, f"category #{index} has no integer id: {category!r}")
        elif cid in category_ids:
            report("error", None, f"duplicate category id {cid}")
        else:
            category_ids.add(cid)
            categories.append({**category, "name": str(category.get("name", cid))})

    entries, seen_files = [], {}
    for index, image in enumerate(dataset.get("images", [])):
        if not isinstance(image, dict):
            report("error", None, f"image entry #{index} is not an object: {image!r}")
            continue
        image_id, file_name = image.get("id"), image.get("file_name")
        if not _is_int(image_id):
            report("error", image, f"image entry #{index} ({file_name!r}) has no integer id: {image_id!r}")
        elif image_id in seen_files:
            report("error", image, f"duplicate image id {image_id}: {file_name!r} and {seen_files[image_id]!r}",
                   image_id)
        elif not isinstance(file_name, str) or not file_name:
            seen_files[image_id] = file_name
            report("error", image, f"no file_name: {file_name!r}", image_id)
        else:
            seen_files[image_id] = file_name
            entries.append(image)

    images, sizes, unusable = [], {}, set(seen_files)
    for image, (size, reason) in zip(entries, _inspect_images([image_dir / e["file_name"] for e in entries],
                                                              check_pixels)):
        image_id, path = image["id"], image_dir / image["file_name"]
        if reason is not None:
            report("error", image, reason, image_id)
            continue
        recorded = (image.get("width"), image.get("height"))
        if recorded != size and recorded != (None, None):  # an entry without a size takes the file's
            shown = f"{recorded[0]}x{recorded[1]}" if all(_is_number(v) for v in recorded) else repr(recorded)
            report("error", image, f"recorded size {shown} (width x height) differs from the file's "
                   f"{size[0]}x{size[1]}: {path}", image_id)
            continue
        unusable.discard(image_id)
        sizes[image_id] = size
        images.append({**image, "width": size[0], "height": size[1]})

    annotations, annotation_ids = [], set()
    for index, ann in enumerate(dataset.get("annotations", [])):
        if not isinstance(ann, dict):
            report("error", None, f"annotation entry #{index} is not an object: {ann!r}")
            continue
        ann_id, image_id = ann.get("id"), ann.get("image_id")
        if not _is_int(ann_id):
            report("error", ann, f"annotation entry #{index} has no integer id: {ann_id!r}", image_id)
            continue
        if ann_id in annotation_ids:
            report("error", ann, f"duplicate annotation id {ann_id}", image_id, ann_id)
            continue
        annotation_ids.add(ann_id)
        if _is_int(image_id) and image_id in unusable:  # its image already has an error
            continue
        if not _is_int(image_id) or image_id not in sizes:
            report("error", ann, f"refers to image id {image_id!r}, which is not among the images", None, ann_id)
            continue
        failed = False
        category_id = ann.get("category_id")
        if not _is_int(category_id) or category_id not in category_ids:
            report("error", ann, f"unknown category id {category_id!r} "
                   f"(the categories are {sorted(category_ids)})", image_id, ann_id)
            failed = True
        crowd = ann.get("iscrowd", 0)
        if crowd not in (0, 1):
            report("error", ann, f"iscrowd must be 0 or 1, got {crowd!r}", image_id, ann_id)
            failed = True
        bbox = ann.get("bbox")
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(_is_number(v) for v in bbox)):
            report("error", ann, f"malformed bbox {bbox!r}: needs 4 finite numbers [x, y, width, height]",
                   image_id, ann_id)
            failed = True
        width, height = sizes[image_id]
        segmentation = ann.get("segmentation")
        if need_masks and not failed:
            segmentation, error, warning = _check_segmentation(segmentation, width, height)
            if error:
                report("error", ann, error, image_id, ann_id)
                failed = True
            elif warning:
                report("warning", ann, warning, image_id, ann_id)
                if segmentation is None:
                    continue
        if failed:
            continue
        x, y, w, h = (float(v) for v in bbox)
        if w <= 0 or h <= 0:
            report("warning", ann, f"box {bbox} has zero or negative width or height; dropped", image_id, ann_id)
            continue
        x2, y2 = x + w, y + h
        cx1, cy1 = min(max(x, 0.0), width), min(max(y, 0.0), height)
        cx2, cy2 = min(max(x2, 0.0), width), min(max(y2, 0.0), height)
        if cx2 - cx1 < MIN_BOX_SIZE or cy2 - cy1 < MIN_BOX_SIZE:
            if x2 <= 0 or y2 <= 0 or x >= width or y >= height:
                reason = f"lies outside the {width}x{height} image"
            else:
                reason = f"is less than {MIN_BOX_SIZE} px wide or high inside the {width}x{height} image"
            report("warning", ann, f"box {bbox} {reason}; dropped", image_id, ann_id)
            continue
        clipped = [cx1, cy1, cx2 - cx1, cy2 - cy1]
        overhang = max(-x, -y, x2 - width, y2 - height)
        if overhang > CLIP_TOLERANCE:
            report("warning", ann, f"box {bbox} extends {overhang:.3g} px past the {width}x{height} image; "
                   f"clipped to {[round(v, 3) for v in clipped]}", image_id, ann_id)
        area = ann.get("area")
        if not (_is_number(area) and area >= 0) or (clipped != [x, y, w, h] and segmentation is None):
            area = clipped[2] * clipped[3]
        cleaned = {**ann, "bbox": clipped, "area": area, "iscrowd": int(crowd)}
        if need_masks:
            cleaned["segmentation"] = segmentation
        annotations.append(cleaned)

    return {**dataset, "images": images, "annotations": annotations, "categories": categories}, problems


# ---------------------------------------------------------------------------------------------- a config's data


@dataclass
class CheckedSplit:
    """One split of a config after validation: the cleaned COCO dict (None if unreadable) and its problems."""

    name: str
    source: str  # the annotation file or dataset folder, as named in messages
    image_dir: Path  # the folder the images' file_name entries are relative to
    dataset: dict | None
    problems: list[Problem] = field(default_factory=list)


def _adopt_categories(dataset: dict, train_categories: list[dict], name: str, source: str,
                      problems: list[Problem]) -> dict:
    """A converted val split with the training categories (matched by name), so that labels agree."""
    by_name = {}
    for category in sorted(train_categories, key=lambda c: c["id"]):
        by_name.setdefault(category["name"], category["id"])
    mapping = {}
    for category in dataset["categories"]:
        if category["name"] in by_name:
            mapping[category["id"]] = by_name[category["name"]]
        else:
            problems.append(Problem("error", source, None, None, f"data.{name}: class {category['name']!r} is not "
                                    f"among the training classes {list(by_name)}"))
    annotations = [{**a, "category_id": mapping.get(a["category_id"], a["category_id"])}
                   for a in dataset["annotations"]]
    return {**dataset, "annotations": annotations, "categories": [dict(c) for c in train_categories]}


def require_image_folder(images: str | Path, source: str | Path) -> Path:
    """The image folder of a split, or a DataError naming it and the file that names it (not one per image)."""
    images = Path(images)
    if not images.is_dir():
        raise DataError(f"image folder not found: {images} (named with {source})")
    return images


def read_validated_coco(annotations: str | Path, images: str | Path, need_masks: bool = False) -> dict:
    """The cleaned dict of a COCO file checked as a run checks its data (image headers, every annotation).

    Errors raise :class:`~labelenc.data.problems.DataValidationError` listing every problem; warnings are logged.
    """
    image_dir = require_image_folder(images, annotations)
    dataset, problems = validate_coco(read_coco_json(annotations), image_dir, str(annotations), need_masks=need_masks)
    raise_or_log({str(annotations): problems})
    return dataset


def _read_split(split: SplitConfig, class_names: list[str] | None, problems: list[Problem]) -> dict:
    if split.format == "coco":
        dataset = read_coco_json(split.annotations)
        require_image_folder(split.images, split.annotations)
        return dataset
    convert = voc_to_coco if split.format == "voc" else yolo_to_coco
    return convert(split.root, split.split, class_names, problems)


def _no_box_to_train_on(split: CheckedSplit) -> list[Problem]:
    """An error if the cleaned training split holds no box a detector trains on (crowd regions do not count)."""
    if any(not a["iscrowd"] for a in split.dataset["annotations"]):
        return []
    return [Problem("error", split.source, None, None, f"data.{split.name} has no box to train on: "
                    f"{plural(len(split.dataset['images']), 'usable image')}, none with a usable box (dropped boxes "
                    "are listed above; crowd and VOC difficult regions are not trained on)")]


def _other_categories(split: CheckedSplit, train_categories: list[dict]) -> list[Problem]:
    """An error if the split's category ids differ from the training split's: a run scores labels by them."""
    names = {c["id"]: c["name"] for c in train_categories}
    own = {c["id"]: c["name"] for c in split.dataset["categories"]}
    if sorted(own) == sorted(names):
        return []

    def listed(ids: set[int], categories: dict[int, str]) -> str:
        return ", ".join(f"{i} {categories[i]!r}" for i in sorted(ids)) or "none"

    return [Problem("error", split.source, None, None, f"data.{split.name}'s category ids differ from data.train's "
                    f"(only in data.{split.name}: {listed(own.keys() - names.keys(), own)}; only in data.train: "
                    f"{listed(names.keys() - own.keys(), names)}): evaluation needs the training categories")]


def check_data(cfg: Config, need_masks: bool = False, check_pixels: bool = False) -> dict[str, CheckedSplit]:
    """Read (converting VOC / YOLO) and validate the train and val splits of ``cfg.data``, as a run needs them.

    A val split in VOC or YOLO format takes the training categories, matched by class name; a COCO one must have
    the training category ids. The training split needs at least one box. ``need_masks``: the detector trains
    on instance masks and evaluates them (``model.family=mask_rcnn``).
    """
    checked: dict[str, CheckedSplit] = {}
    train_categories = None
    for name in ("train", "val"):
        split = getattr(cfg.data, name)
        coco = split.format == "coco"
        source = str(split.annotations if coco else split.root)
        image_dir = Path(split.images if coco else split.root)
        problems: list[Problem] = []
        checked[name] = result = CheckedSplit(name, source, image_dir, None, problems)
        if need_masks and not coco:
            problems.append(Problem("error", source, None, None, f"data.{name}.format={split.format} has boxes "
                                    f"only; model.family={cfg.model.family} needs COCO instance masks"))
            continue
        class_names = split.class_names
        if name == "val" and train_categories is not None and split.format == "voc" and class_names is None:
            class_names = [c["name"] for c in sorted(train_categories, key=lambda c: c["id"])]
        try:
            dataset = _read_split(split, class_names, problems)
        except DataError as err:
            problems.append(Problem("error", source, None, None, str(err)))
            continue
        if name == "val" and train_categories is not None and not coco:
            dataset = _adopt_categories(dataset, train_categories, name, source, problems)
        result.dataset, found = validate_coco(dataset, image_dir, source, check_pixels, need_masks)
        problems.extend(found)
        if name == "train":
            train_categories = result.dataset["categories"]
            problems.extend(_no_box_to_train_on(result))
        elif train_categories is not None:
            problems.extend(_other_categories(result, train_categories))
    return checked


def report_problems(checked: dict[str, CheckedSplit], strict: bool = False, log: bool = True) -> None:
    """Raise DataValidationError on errors (or warnings, if ``strict``), else log the warnings: see raise_or_log."""
    raise_or_log({name: split.problems for name, split in checked.items()}, strict, log)
