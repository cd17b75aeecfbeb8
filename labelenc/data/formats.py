"""COCO JSON files, and Pascal VOC and YOLO datasets as in-memory COCO dicts: everything downstream reads COCO.

Both converters are one-way and deterministic: images in a stable order with ids ``1..N``, annotations in image
then object order with ids ``1..M``, categories ``1..C`` in the order of the class list (given, or inferred and
written out). Image ``file_name`` entries are relative to the dataset root (``JPEGImages/x.jpg``,
``images/train/x.jpg``), so the root is the COCO image folder. Converted entries carry ``source`` (the XML or
label file) and ``source_line`` / ``source_object`` keys, so that every problem names the file it came from;
:func:`write_coco` leaves them out of the JSON it writes.

Problems found while converting (unreadable XML, malformed YOLO lines, unknown class names, inverted VOC boxes,
YOLO boxes in pixels) are appended to the ``problems`` list when one is given and the offending entry is skipped;
without a list, any error raises :class:`~labelenc.data.problems.DataValidationError` naming every problem, and
warnings are logged. :func:`read_coco_json` and :func:`write_coco` read and write COCO annotation files.
"""

from __future__ import annotations

import json
import math
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path

import yaml
from PIL import Image

from labelenc.data.problems import DataError, Problem, raise_or_log
from labelenc.fileio import write_json_atomic

__all__ = [
    "IMAGE_EXTENSIONS",
    "SOURCE_KEYS",
    "parse_class_names",
    "read_class_file",
    "read_coco_json",
    "voc_to_coco",
    "write_coco",
    "yolo_to_coco",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
SOURCE_KEYS = ("source", "source_line", "source_object")


def _finish(dataset: dict, found: list[Problem], problems: list[Problem] | None, what: str) -> dict:
    if problems is not None:
        problems.extend(found)
    else:
        raise_or_log({what: found})
    return dataset


def _categories(names: Sequence[str]) -> list[dict]:
    return [{"id": i + 1, "name": name, "supercategory": ""} for i, name in enumerate(names)]


def _check_names(names: Sequence[str], where: str) -> list[str]:
    names = [str(n).strip() for n in names]
    if not names:
        raise DataError(f"{where}: the class list is empty")
    if any(not n for n in names):
        raise DataError(f"{where}: the class list holds an empty name: {names}")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise DataError(f"{where}: the class list names {duplicates} more than once")
    return names


def read_class_file(path: str | Path) -> list[str]:
    """Class names of a text file (one per line, blank lines ignored) or a YAML file with ``names``."""
    path = Path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"cannot read class file {path}: {err}") from None
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            names = (yaml.safe_load(text) or {}).get("names")
        except (yaml.YAMLError, AttributeError) as err:
            raise DataError(f"class file {path} is not a YAML mapping with 'names': {err}") from None
        if isinstance(names, dict):  # Ultralytics style {0: person, 1: car}
            try:
                names = [names[k] for k in sorted(names, key=int)]
            except (TypeError, ValueError):
                raise DataError(f"class file {path}: 'names' keys must be the class indices 0..C-1") from None
        if not isinstance(names, list):
            raise DataError(f"class file {path} has no 'names' list")
        return _check_names(names, str(path))
    return _check_names([line for line in text.splitlines() if line.strip()], str(path))


def parse_class_names(text: str | None) -> list[str] | None:
    """``a,b,c`` or the path of a class file (see :func:`read_class_file`); ``None`` stays ``None``."""
    if text is None:
        return None
    if Path(text).is_file():
        return read_class_file(text)
    return _check_names(text.split(","), "--classes")


def _image_size(path: Path) -> tuple[int, int] | None:
    """(width, height) from the file header, or None when it cannot be read (the validator reports it)."""
    try:
        with Image.open(path) as img:
            return img.size
    except Exception:  # noqa: BLE001 - any unreadable file; reported with its reason by validate_coco
        return None


def _find_image(folder: Path, stem: str) -> Path | None:
    for ext in IMAGE_EXTENSIONS + tuple(e.upper() for e in IMAGE_EXTENSIONS):
        if (folder / f"{stem}{ext}").is_file():
            return folder / f"{stem}{ext}"
    return None


# --------------------------------------------------------------------------------------------------- Pascal VOC


def voc_to_coco(
    root: str | Path,
    split: str | None = None,
    class_names: Sequence[str] | None = None,
    problems: list[Problem] | None = None,
) -> dict:
    """A Pascal VOC folder (``Annotations/*.xml``, ``JPEGImages/``, ``ImageSets/Main/<split>.txt``) as a COCO dict.

    ``root`` is one VOC year folder (e.g. ``VOCdevkit/VOC2007``). ``split`` names ``ImageSets/Main/<split>.txt``
    (its first column lists the image ids); ``None`` takes every XML file in ``Annotations/``, sorted.
    ``class_names`` fixes the classes and their order (category ids ``1..C``); ``None`` infers the sorted set of
    object names in the split. An object whose name is not in a given list is a problem.

    Coordinates: VOC boxes are 1-based pixel indices, ``xmax`` and ``ymax`` inclusive (floats are accepted). As the
    VOC devkit and detectron2 do, they become the COCO box ``x = xmin - 1, y = ymin - 1, w = xmax - xmin + 1,
    h = ymax - ymin + 1``: a box over the whole ``W x H`` image (1, 1, W, H) is ``[0, 0, W, H]``.
    ``difficult`` objects become ``iscrowd=1`` annotations: training leaves them out and COCO evaluation treats
    them as ignore regions, as the VOC evaluation ignores them.
    """
    root = Path(root)
    where = f"VOC dataset {root}"
    annotations_dir, images_dir = root / "Annotations", root / "JPEGImages"
    if not annotations_dir.is_dir():
        raise DataError(f"{where}: no Annotations/ folder (is it a VOC year folder such as VOCdevkit/VOC2007?)")
    found: list[Problem] = []
    if split is None:
        xml_files = sorted(annotations_dir.glob("*.xml"))
    else:
        split_file = root / "ImageSets" / "Main" / f"{split}.txt"
        try:
            lines = split_file.read_text().splitlines()
        except (OSError, UnicodeDecodeError) as err:
            raise DataError(f"{where}: cannot read the split file {split_file}: {err}") from None
        stems = list(dict.fromkeys(line.split()[0] for line in lines if line.strip()))
        xml_files = []
        for stem in stems:
            path = annotations_dir / f"{stem}.xml"
            if path.is_file():
                xml_files.append(path)
            else:
                found.append(Problem("error", str(path), None, None, f"listed in {split_file} but missing"))
    if not xml_files and not found:
        raise DataError(f"{where}: no annotation files" + (f" in split {split!r}" if split else " in Annotations/"))

    parsed = []  # (xml path, file_name, width, height, [(object index, name, difficult, bbox)])
    for path in xml_files:
        entry = _parse_voc_xml(path, images_dir, found)
        if entry is not None:
            parsed.append(entry)

    if class_names is None:
        names = sorted({obj[1] for entry in parsed for obj in entry[4]})
        if not names:
            raise DataError(f"{where}: no objects to infer the class list from; give the class names")
    else:
        names = _check_names(class_names, where)
    category_of = {name: i + 1 for i, name in enumerate(names)}

    images, annotations = [], []
    for image_id, (path, file_name, width, height, objects) in enumerate(parsed, start=1):
        images.append({"id": image_id, "file_name": file_name, "width": width, "height": height,
                       "source": str(path)})
        for index, name, difficult, (xmin, ymin, xmax, ymax) in objects:
            if name not in category_of:
                found.append(Problem("error", str(path), image_id, None,
                                     f"object {index}: class {name!r} is not in the class list {names}"))
                continue
            if xmin > xmax or ymin > ymax:
                found.append(Problem("warning", str(path), image_id, None, f"object {index}: box xmin={xmin:g}, "
                                     f"ymin={ymin:g}, xmax={xmax:g}, ymax={ymax:g} has "
                                     f"{'xmin > xmax' if xmin > xmax else 'ymin > ymax'}; dropped"))
                continue
            w, h = xmax - xmin + 1, ymax - ymin + 1
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": category_of[name],
                "bbox": [xmin - 1, ymin - 1, w, h], "area": w * h if w > 0 and h > 0 else 0.0,
                "iscrowd": int(difficult), "source": str(path), "source_object": index,
            })
    dataset = {"images": images, "annotations": annotations, "categories": _categories(names)}
    return _finish(dataset, found, problems, str(root))


def _text_number(element: ET.Element, tag: str) -> float:
    text = element.findtext(tag)
    if text is None:
        raise ValueError(f"no <{tag}>")
    try:
        return float(text.strip())
    except ValueError:
        raise ValueError(f"<{tag}> is not a number: {text.strip()!r}") from None


def _parse_voc_xml(path: Path, images_dir: Path, found: list[Problem]) -> tuple | None:
    """One XML file; problems go to ``found``, an unreadable file gives None."""
    try:
        tree = ET.parse(path).getroot()
    except (ET.ParseError, OSError) as err:
        found.append(Problem("error", str(path), None, None, f"cannot parse the annotation XML: {err}"))
        return None
    file_name = (tree.findtext("filename") or "").strip()
    if Path(file_name).is_absolute():
        file_name = Path(file_name).name
    image_path = images_dir / file_name if file_name else images_dir / f"{path.stem}.jpg"
    if not image_path.is_file():  # no or a wrong <filename> (e.g. without extension): look for the image by stem
        stems = [Path(file_name).stem] if file_name else []
        image_path = next((p for p in (_find_image(images_dir, s) for s in stems + [path.stem]) if p), image_path)
    width = height = 0
    size = tree.find("size")
    try:
        if size is None:
            raise ValueError("no <size>")
        width, height = int(_text_number(size, "width")), int(_text_number(size, "height"))
    except ValueError:
        pass
    if width <= 0 or height <= 0:  # some VOC-style exports leave <size> out or zero: take the file's
        width, height = _image_size(image_path) or (0, 0)
    objects = []
    for index, obj in enumerate(tree.findall("object"), start=1):
        name = (obj.findtext("name") or "").strip()
        try:
            if not name:
                raise ValueError("no <name>")
            difficult_text = (obj.findtext("difficult") or "0").strip() or "0"
            difficult = float(difficult_text)
            if difficult not in (0, 1):
                raise ValueError(f"<difficult> must be 0 or 1, got {difficult_text!r}")
            box = obj.find("bndbox")
            if box is None:
                raise ValueError("no <bndbox>")
            bbox = tuple(_text_number(box, tag) for tag in ("xmin", "ymin", "xmax", "ymax"))
        except ValueError as err:
            found.append(Problem("error", str(path), None, None, f"object {index}: {err}"))
            continue
        objects.append((index, name, bool(difficult), bbox))
    return path, image_path.relative_to(images_dir.parent).as_posix(), width, height, objects


# --------------------------------------------------------------------------------------------------------- YOLO


def _yolo_class_names(root: Path) -> list[str]:
    for name in ("classes.txt", "data.yaml", "dataset.yaml", "labels/classes.txt"):
        if (root / name).is_file():
            return read_class_file(root / name)
    raise DataError(
        f"YOLO dataset {root}: no class names: give them (data.<split>.class_names in the config, --classes for "
        f"'labelenc data convert') or write {root / 'classes.txt'} (one name per line, in class-index order)"
    )


def yolo_to_coco(
    root: str | Path,
    split: str | None = None,
    class_names: Sequence[str] | str | Path | None = None,
    problems: list[Problem] | None = None,
) -> dict:
    """A YOLO folder (``images/`` and ``labels/``, or ``images/<split>`` and ``labels/<split>``) as a COCO dict.

    Each image ``images/[<split>/]<stem>.<ext>`` has the label file ``labels/[<split>/]<stem>.txt`` with one object
    per line: ``class cx cy w h``, the class a 0-based index, the box normalised by the image size. Boxes become
    pixels with the image's real size (read from the file header). An image without a label file, or with an
    empty one, is a negative. ``class_names`` (a list, or the path of a class file) gives the names in
    class-index order; ``None`` reads ``classes.txt`` or the ``names`` of ``data.yaml`` / ``dataset.yaml`` in
    ``root``. Class ``k`` is category id ``k + 1``.
    """
    root = Path(root)
    where = f"YOLO dataset {root}"
    images_dir, labels_dir = root / "images", root / "labels"
    if split is not None:
        images_dir, labels_dir = images_dir / split, labels_dir / split
    if not images_dir.is_dir():
        raise DataError(f"{where}: image folder not found: {images_dir}")
    if not labels_dir.is_dir():
        raise DataError(f"{where}: label folder not found: {labels_dir}")
    if class_names is None:
        names = _yolo_class_names(root)
    elif isinstance(class_names, (str, Path)):
        names = read_class_file(class_names)
    else:
        names = _check_names(class_names, where)
    image_files = sorted(p for p in images_dir.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not image_files:
        subfolders = sorted(p.name for p in images_dir.iterdir() if p.is_dir())
        hint = f" (it has the folders {subfolders}: name one as the split)" if subfolders else ""
        raise DataError(f"{where}: no images in {images_dir}{hint}")

    found: list[Problem] = []
    stems = {p.stem for p in image_files}
    for label in sorted(labels_dir.glob("*.txt")):
        if label.stem not in stems and label.name != "classes.txt":
            found.append(Problem("warning", str(label), None, None, "label file without an image; not used"))
    images, annotations = [], []
    for image_id, image_path in enumerate(image_files, start=1):
        size = _image_size(image_path)
        width, height = size or (0, 0)
        label = labels_dir / f"{image_path.stem}.txt"
        images.append({"id": image_id, "file_name": image_path.relative_to(root).as_posix(), "width": width,
                       "height": height, "source": str(label if label.is_file() else image_path)})
        if not label.is_file() or size is None:  # a negative; or an unreadable image, which validation reports
            continue
        try:
            lines = label.read_text().splitlines()
        except (OSError, UnicodeDecodeError) as err:
            found.append(Problem("error", str(label), image_id, None, f"cannot read the label file: {err}"))
            continue
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            parsed = _parse_yolo_line(line, len(names))
            if isinstance(parsed, str):
                found.append(Problem("error", str(label), image_id, None, parsed, line=number))
                continue
            cls, cx, cy, w, h = parsed
            if max(cx, cy, w, h) > 1:
                found.append(Problem("warning", str(label), image_id, None, f"box '{' '.join(line.split()[1:])}' "
                                     "has values above 1, but YOLO boxes are normalised to 0..1 by the image size: "
                                     "this file seems to hold pixel coordinates; dropped", line=number))
                continue
            box = [(cx - w / 2) * width, (cy - h / 2) * height, w * width, h * height]
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": cls + 1, "bbox": box,
                "area": box[2] * box[3] if box[2] > 0 and box[3] > 0 else 0.0, "iscrowd": 0,
                "source": str(label), "source_line": number,
            })
    dataset = {"images": images, "annotations": annotations, "categories": _categories(names)}
    return _finish(dataset, found, problems, str(root))


def _parse_yolo_line(line: str, num_classes: int) -> tuple[int, float, float, float, float] | str:
    """``(class, cx, cy, w, h)`` or the reason the line cannot be used."""
    fields = line.split()
    if len(fields) != 5:
        return f"expected 5 fields 'class cx cy w h', got {len(fields)}: {line.strip()!r}"
    try:
        cls_value = float(fields[0])
        values = [float(f) for f in fields[1:]]
    except ValueError:
        return f"not numbers: {line.strip()!r}"
    if not cls_value.is_integer():
        return f"class index {fields[0]!r} is not an integer"
    cls = int(cls_value)
    if not 0 <= cls < num_classes:
        return f"class index {cls} is not in 0..{num_classes - 1} (the class list has {num_classes} names)"
    if not all(math.isfinite(v) for v in values):
        return f"box values must be finite numbers: {line.strip()!r}"
    return cls, *values


# ---------------------------------------------------------------------------------------------------------- I/O


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


def write_coco(dataset: dict, path: str | Path) -> Path:
    """Write a COCO dict as JSON (without the converters' ``source`` keys) atomically, creating the folder."""

    def strip(entries: list[dict]) -> list[dict]:
        return [{k: v for k, v in e.items() if k not in SOURCE_KEYS} for e in entries]

    out = {**dataset, "images": strip(dataset["images"]), "annotations": strip(dataset["annotations"])}
    return write_json_atomic(path, out, indent=None)
