"""Embedded synthetic COCO detection dataset: randomly coloured shapes on noisy backgrounds, learnable on a CPU."""

from __future__ import annotations

import json
import math
from numbers import Integral
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from labelenc.data.problems import DataError
from labelenc.fileio import write_atomic, write_text_atomic

__all__ = ["SHAPES", "generate_synthetic_dataset"]

# Class k is SHAPES[k], with COCO category id CATEGORY_ID_STEP * (k + 1): deliberately not contiguous.
SHAPES = ("rectangle", "ellipse", "triangle", "cross", "ring", "star", "diamond", "hexagon")
CATEGORY_ID_STEP = 10
MIN_OBJECT_SIZE = 8  # px, default shortest box side before occlusion
MAX_OBJECT_FRACTION = 0.7  # longest box side, as a fraction of the image side
ASPECT_RANGE = (0.6, 1.0)  # short side / long side
MIN_VISIBLE_AREA = 20  # px; objects occluded below this are dropped (and not drawn)
MIN_VISIBLE_SIDE = 2  # px; objects whose visible box is thinner are dropped
EMPTY_FRACTION = 0.05  # images without objects
MIN_IMAGE_SIZE = 32
MIN_CONTRAST = 60.0  # luminance gap between an object and the background it covers
_LUMA = np.array([0.299, 0.587, 0.114])
_COLOUR_CANDIDATES = 16
# Vertex radii of the regular and star polygons, at equally spaced angles with a random phase.
_RADIAL_POLYGONS = {"triangle": (1.0,) * 3, "hexagon": (1.0,) * 6, "star": (1.0, 0.45) * 5}


class _Shape(NamedTuple):
    """One object: 0-based class, boolean H x W mask, and its COCO polygon when the mask is exactly that polygon."""

    label: int
    mask: np.ndarray
    polygon: list[float] | None


def generate_synthetic_dataset(
    out_dir: str | Path,
    seed: int = 0,
    num_train: int = 256,
    num_val: int = 64,
    image_size: int = 128,
    num_classes: int = 4,
    max_objects: int = 6,
    min_object_size: int = MIN_OBJECT_SIZE,
) -> dict[str, Path]:
    """Write train/val COCO instance JSONs and PNGs under ``out_dir``, byte-identical for a given seed.

    Layout: ``annotations/instances_{train,val}.json`` and ``{train,val}/<file_name>.png``. Each image holds
    0 (about 5% of images) to ``max_objects`` shapes of ``num_classes`` classes (``SHAPES[:num_classes]``) whose
    colours are random, so only the shape identifies the class. Later shapes occlude earlier ones; masks, boxes
    and areas describe the visible pixels only. Unoccluded polygonal shapes get polygon segmentations, the
    others RLE. Box sides before occlusion are log-uniform from ``min_object_size`` pixels to 0.7 of the image
    side: raising the minimum removes the tiniest objects, which a small detector learns last. Returns
    ``{"train": json path, "val": json path}``.
    """
    _check_int("seed", seed, 0)
    _check_int("num_train", num_train, 1)
    _check_int("num_val", num_val, 1)
    _check_int("image_size", image_size, MIN_IMAGE_SIZE)
    _check_int("num_classes", num_classes, 1, len(SHAPES))
    _check_int("max_objects", max_objects, 1)
    _check_int("min_object_size", min_object_size, 2, int(MAX_OBJECT_FRACTION * image_size))
    root = Path(out_dir)
    paths = {}
    for split_index, (split, num_images) in enumerate((("train", num_train), ("val", num_val))):
        rng = np.random.default_rng([seed, split_index])
        dataset = _write_split(root / split, rng, num_images, image_size, num_classes, max_objects, min_object_size)
        # JSON without indent or final newline, as the generator always wrote it: the files stay byte-identical.
        paths[split] = write_text_atomic(root / "annotations" / f"instances_{split}.json", json.dumps(dataset))
    return paths


def _check_int(name: str, value: object, low: int, high: int | None = None) -> None:
    """Raise a DataError (a ValueError) naming the argument unless it is an integer in [low, high]."""
    if isinstance(value, bool) or not isinstance(value, Integral) or value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise DataError(f"{name} must be an integer {bound}, got {value!r}")


def _write_split(
    image_dir: Path, rng: np.random.Generator, num_images: int, size: int, num_classes: int, max_objects: int,
    min_object_size: int,
) -> dict:
    """Render one split's PNGs into ``image_dir`` and return its COCO dataset dict."""
    empty = set(rng.choice(num_images, size=round(EMPTY_FRACTION * num_images), replace=False).tolist())
    images, annotations = [], []
    for index in range(num_images):
        image_id = index + 1
        file_name = f"{image_id:06d}.png"
        count = 0 if index in empty else int(rng.integers(1, max_objects + 1))
        pixels, shapes = _render_image(rng, size, num_classes, count, min_object_size)
        image = Image.fromarray(pixels)
        write_atomic(image_dir / file_name, lambda f: image.save(f, format="PNG", compress_level=1))
        images.append({"id": image_id, "file_name": file_name, "width": size, "height": size})
        annotations += [_annotation(len(annotations) + 1 + k, image_id, s) for k, s in enumerate(shapes)]
    categories = [
        {"id": CATEGORY_ID_STEP * (k + 1), "name": name, "supercategory": "shape"}
        for k, name in enumerate(SHAPES[:num_classes])
    ]
    info = {"description": "labelenc synthetic shapes", "version": "1.0"}
    return {"info": info, "licenses": [], "images": images, "annotations": annotations, "categories": categories}


def _annotation(annotation_id: int, image_id: int, shape: _Shape) -> dict:
    """COCO annotation of a visible mask: polygon if available, else RLE; tight box and pixel area of the mask."""
    rle = mask_utils.encode(np.asfortranarray(shape.mask.astype(np.uint8)))
    if shape.polygon is None:
        segmentation = {"size": rle["size"], "counts": rle["counts"].decode("ascii")}
    else:
        segmentation = [shape.polygon]
    return {
        "id": annotation_id,
        "image_id": image_id,
        "category_id": CATEGORY_ID_STEP * (shape.label + 1),
        "bbox": mask_utils.toBbox(rle).tolist(),
        "area": float(mask_utils.area(rle)),
        "iscrowd": 0,
        "segmentation": segmentation,
    }


def _render_image(
    rng: np.random.Generator, size: int, num_classes: int, count: int, min_object_size: int
) -> tuple[np.ndarray, list[_Shape]]:
    """Draw ``count`` shapes (largest first) on a fresh background; return uint8 HxWx3 pixels and the kept shapes."""
    background = _background(rng, size)
    shapes = [_sample_shape(rng, size, int(rng.integers(num_classes)), min_object_size) for _ in range(count)]
    shapes.sort(key=lambda s: -int(s.mask.sum()))
    shapes = _resolve_occlusion(shapes, size)
    image = background.copy()
    for shape in shapes:
        image[shape.mask] = _contrasting_colour(rng, background[shape.mask])
    image += rng.uniform(2.0, 10.0) * rng.standard_normal(image.shape, dtype=np.float32)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), shapes


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Smooth random float32 HxWx3 field: a dark or light tinted base, a linear gradient and upsampled coarse noise."""
    level = rng.uniform(25, 95) if rng.random() < 0.5 else rng.uniform(160, 230)
    base = level + rng.normal(0.0, 12.0, 3)
    theta = rng.uniform(0.0, 2 * math.pi)
    coords = ((np.arange(size) + 0.5) / size - 0.5).astype(np.float32)
    ramp = math.cos(theta) * coords[None, :] + math.sin(theta) * coords[:, None]
    gradient = ramp[..., None] * rng.uniform(-40.0, 40.0, 3).astype(np.float32)
    grid = int(rng.integers(3, 7))
    coarse = rng.normal(0.0, 18.0, (3, grid, grid)).astype(np.float32)
    blobs = np.stack([np.asarray(Image.fromarray(c).resize((size, size), Image.BICUBIC)) for c in coarse], axis=-1)
    return base.astype(np.float32) + gradient + blobs


def _sample_shape(rng: np.random.Generator, size: int, label: int, min_side: int) -> _Shape:
    """A shape of class ``label`` in a random box (log-uniform side, random aspect) lying inside the image."""
    long_side = math.exp(rng.uniform(math.log(min_side), math.log(MAX_OBJECT_FRACTION * size)))
    short_side = max(min_side, long_side * rng.uniform(*ASPECT_RANGE))
    w, h = (long_side, short_side) if rng.random() < 0.5 else (short_side, long_side)
    x0, y0 = rng.uniform(0.0, size - w), rng.uniform(0.0, size - h)
    name = SHAPES[label]
    if name in ("ellipse", "ring"):
        centres = np.arange(size) + 0.5
        dist_sq = ((centres[None, :] - x0 - w / 2) / (w / 2)) ** 2 + ((centres[:, None] - y0 - h / 2) / (h / 2)) ** 2
        mask = dist_sq <= 1.0
        if name == "ring":
            mask &= dist_sq >= rng.uniform(0.4, 0.65) ** 2  # inner radius, relative
        return _Shape(label, mask, None)
    unit = _unit_polygon(rng, name)
    vertices = np.round(np.array([x0, y0]) + (unit + 1.0) / 2.0 * np.array([w, h]), 2)
    polygon = vertices.ravel().tolist()
    # Rasterise with pycocotools so that the drawn pixels are exactly the mask COCO decodes from the polygon.
    mask = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects([polygon], size, size))).astype(bool)
    return _Shape(label, mask, polygon)


def _unit_polygon(rng: np.random.Generator, name: str) -> np.ndarray:
    """Vertices (K x 2, x/y) of a polygonal shape whose bounding box is exactly [-1, 1]^2."""
    if name == "rectangle":
        return np.array([[-1.0, -1.0], [1.0, -1.0], [1.0, 1.0], [-1.0, 1.0]])
    if name == "diamond":
        return np.array([[0.0, -1.0], [1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    if name == "cross":
        t = rng.uniform(0.25, 0.45)  # half arm width
        return np.array(
            [[-t, -1], [t, -1], [t, -t], [1, -t], [1, t], [t, t], [t, 1], [-t, 1], [-t, t], [-1, t], [-1, -t], [-t, -t]]
        )
    radii = np.array(_RADIAL_POLYGONS[name])
    angles = rng.uniform(0.0, 2 * math.pi) + 2 * math.pi * np.arange(len(radii)) / len(radii)
    points = radii[:, None] * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    low, high = points.min(axis=0), points.max(axis=0)
    return 2.0 * (points - low) / (high - low) - 1.0


def _resolve_occlusion(shapes: list[_Shape], size: int) -> list[_Shape]:
    """Clip shapes to their visible pixels (later on top), drop tiny or thin ones; only intact ones keep polygons."""
    covered = np.zeros((size, size), dtype=bool)
    kept = []
    for shape in reversed(shapes):
        visible = shape.mask & ~covered
        rows, cols = np.flatnonzero(visible.any(axis=1)), np.flatnonzero(visible.any(axis=0))
        if visible.sum() < MIN_VISIBLE_AREA or min(np.ptp(rows), np.ptp(cols)) + 1 < MIN_VISIBLE_SIDE:
            continue
        covered |= shape.mask
        intact = np.array_equal(visible, shape.mask)
        kept.append(_Shape(shape.label, visible, shape.polygon if intact else None))
    return kept[::-1]


def _contrasting_colour(rng: np.random.Generator, covered_pixels: np.ndarray) -> np.ndarray:
    """A random RGB colour whose luminance differs enough from the pixels it covers (else the most different)."""
    candidates = rng.integers(0, 256, (_COLOUR_CANDIDATES, 3)).astype(np.float64)
    gap = np.abs(candidates @ _LUMA - covered_pixels.mean(axis=0) @ _LUMA)
    good = np.flatnonzero(gap >= MIN_CONTRAST)
    return candidates[good[0] if good.size else int(gap.argmax())]
