"""Export a trained detector (the plain torchvision model) to TorchScript or ONNX, and check the file against PyTorch.

The detector is built from the config, loaded from a weights file (``model_final.pth`` of ``train`` / ``step2``, or
the detector part of a ``checkpoint_*.pth``) with :func:`labelenc.runner.load_detector_weights`, and exported on the
CPU in eval mode:

- ``torchscript``: ``torch.jit.script`` (torchvision's detectors are scriptable), saved with ``torch.jit.save``. Call
  it as ``model([image, ...])``; it returns ``(losses, detections)`` (torchvision's scripted signature, losses empty in
  eval), ``detections`` one ``{"boxes", "scores", "labels"[, "masks"]}`` per image.
- ``onnx``: ``torch.onnx.export(..., dynamo=False)``, the TorchScript-based exporter, opset :data:`ONNX_OPSET`. The
  ``torch.export``-based (dynamo) exporter cannot export these models with torch 2.14: the data-dependent branches of
  their post-processing (batched NMS) fail ``torch.export``. The graph is traced on one image at the config's input
  resolution, with height and width dynamic: input ``image``, float32 ``[3, H, W]``, RGB in ``[0, 1]``, one image per
  call (any H and W: the graph resizes and normalises it as the detector does); outputs ``boxes`` float32 ``[N, 4]``
  (x1, y1, x2, y2 in input-image pixels), ``scores`` float32 ``[N]``, ``labels`` int64 ``[N]`` (1..C, see the
  ``class_names`` metadata; 0 is the background, which the sigmoid heads of RetinaNet and FCOS may return with a
  low score: skip it, as ``labelenc eval`` does) and, for Mask R-CNN, ``masks`` float32 ``[N, 1, H, W]``.

Both exported models resize with :class:`ExactResizeTransform` instead of torchvision's transform: torchvision
computes the resized size in float32 when scripted or traced (float64 when eager), so that many image sizes came out
one pixel smaller than in the eager model, and boxes moved by up to a pixel.

Both files carry metadata (TorchScript: the extra file ``labelenc.json``; ONNX: ``metadata_props``): family, class
names, input and output description, score threshold, source weights.

Parity: the file is written (atomically) under a temporary name ``STEM.unverified.SUFFIX``, loaded back
(``torch.jit.load`` / ``onnxruntime.InferenceSession``) and run, one image at a time, on up to
:data:`PARITY_IMAGES` validation images of the config, next to the PyTorch model. Every detection of either output
must have a counterpart in the other with the same label, boxes within :data:`BOX_TOL` pixels and score within
:data:`SCORE_TOL`, except detections at the cut-off (score within :data:`SCORE_TOL` of the score threshold, or of
the image's lowest score when the list is full), which may legitimately be on one side only. Detections are
matched by value, not by position, so that ties in score may come in either order. On success the file is renamed
to the requested path; on failure it is renamed to ``STEM.parity-failed.SUFFIX`` (kept for inspection, never under
the requested name, and a previous file at the requested path is left as it was).
"""

# No ``from __future__ import annotations`` here: TorchScript compiles :class:`ExactResizeTransform` and needs its
# annotations as objects.
import io
import json
import logging
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
import torchvision
from torch import Tensor, nn
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from labelenc import __version__, runner
from labelenc.config import Config
from labelenc.data.loader import build_datasets
from labelenc.errors import UserError
from labelenc.fileio import write_atomic
from labelenc.models import build_detector

logger = logging.getLogger(__name__)

FORMATS = ("torchscript", "onnx")
SUFFIX = {"torchscript": ".pt", "onnx": ".onnx"}  # only for messages: any file name is accepted
ONNX_OPSET = 17
PARITY_IMAGES = 8
BOX_TOL = 1e-2  # pixels, absolute
SCORE_TOL = 1e-3  # absolute
ONNX_MAX_BYTES = 2**31 - 1  # one ONNX protobuf file holds at most 2 GiB
# (family or backbone, format) -> why it cannot be exported to that format. All four families export to both
# formats and pass the parity check with torch 2.14 / torchvision 0.29; deformable convolution has no ONNX operator.
_NO_ONNX_DCN = "torchvision.ops.deform_conv2d has no ONNX operator (export TorchScript instead)"
UNSUPPORTED: dict[tuple[str, str], str] = {("resnet50_dcn", "onnx"): _NO_ONNX_DCN,
                                           ("resnet101_dcn", "onnx"): _NO_ONNX_DCN}
METADATA = "labelenc.json"  # TorchScript extra file holding the metadata


class ExportError(UserError):
    """The model cannot be exported to the requested format; the message names the family, format and reason."""


@dataclass
class ExportReport:
    """Where the file is and how the exported model compared with PyTorch."""

    path: Path  # the requested path on success, the ``.parity-failed`` file on failure
    format: str
    family: str
    passed: bool
    images: int  # images compared
    detections: int  # detections matched (PyTorch side)
    max_box_diff: float  # pixels, over matched detections
    max_score_diff: float
    max_mask_diff: float | None = None  # Mask R-CNN only; informational, not part of the verdict
    borderline: int = 0  # detections at the score cut-off present on one side only (allowed)
    unmatched: list[str] = field(default_factory=list)  # detections without a counterpart within tolerance
    score_thresh: float = 0.0
    seconds: float = 0.0
    random_images: bool = False  # the validation split had no image: seeded random images were used

    def lines(self) -> list[str]:
        """What the command prints: the file, the largest differences and PASS / FAIL."""
        size = self.path.stat().st_size / 2**20 if self.path.is_file() else float("nan")
        what = f"onnx, opset {ONNX_OPSET}" if self.format == "onnx" else "torchscript"
        source = "random images (the validation split is empty)" if self.random_images else "validation images"
        mask = "" if self.max_mask_diff is None else f", max |Δmask| {self.max_mask_diff:.1e} (not checked)"
        lines = [
            f"exported: {self.path} ({self.family}, {what}, {size:.1f} MiB, {self.seconds:.1f} s)",
            f"parity with PyTorch on {self.images} {source}: {self.detections} detections matched (same label), "
            f"max |Δbox| {self.max_box_diff:.1e} px (tolerance {BOX_TOL:g}), max |Δscore| "
            f"{self.max_score_diff:.1e} (tolerance {SCORE_TOL:g}){mask}"
            + (f"; {self.borderline} at the score cut-off on one side only" if self.borderline else ""),
        ]
        if self.detections == 0 and self.borderline:
            lines.append(f"note: no detection was compared: all {self.borderline} lie within {SCORE_TOL:g} of the "
                         "score cut-off, where tied scores may keep different boxes (an untrained model?)")
        elif self.detections == 0:
            lines.append(f"note: no detection scored above the score threshold {self.score_thresh:g} on these "
                         "images, so no box was compared; --score-thresh lowers it (it is saved in the file)")
        lines += [f"  no counterpart: {u}" for u in self.unmatched[:5]]
        if len(self.unmatched) > 5:
            lines.append(f"  ... and {len(self.unmatched) - 5} more")
        lines.append("PASS" if self.passed else "FAIL")
        return lines

    def failure(self) -> str:
        """The one error line of a failed check."""
        return (f"exported {self.format} model does not match PyTorch within tolerance: {len(self.unmatched)} "
                f"detection(s) without a counterpart (box {BOX_TOL:g} px, score {SCORE_TOL:g}); the file is kept as "
                f"{self.path} for inspection, nothing was written under the requested name")


@torch.jit.unused
def _traced_size(image: Tensor, min_size: float, max_size: float) -> List[int]:
    """The resized (height, width) as traced tensors, in float64 as eager Python computes it.

    1-d tensors throughout: the ONNX exporter computes with a 0-d tensor (or ``scalar / tensor``) in float32,
    which resizes some images to one pixel less than eager PyTorch does. (Returns tensors typed as ints, as
    torchvision's own ``_fake_cast_onnx``: under tracing they stand for the sizes.)
    """
    sides = torch._shape_as_tensor(image)[-2:].to(torch.float64)
    limits = torch.tensor([min_size, max_size], dtype=torch.float64)
    scale = (limits / torch.sort(sides).values).min().reshape(1)
    size = torch.floor(sides * scale).to(torch.int64)
    return [size[0], size[1]]  # type: ignore[list-item]


class ExactResizeTransform(GeneralizedRCNNTransform):
    """torchvision's detector transform whose resized image size is the same in eager, scripted and traced models.

    torchvision computes the resize scale in float64 when eager but in float32 when scripted or traced, so for
    many image sizes (e.g. 307x409 or 1000x750 at 800 / 1333) the exported model sees an image one pixel smaller
    than the eager model and its boxes move by up to a pixel. This transform computes the size as eager torchvision
    does (``floor(side * min(min_size / short, max_size / long))`` in float64) in all three modes and resizes to it
    with the same bilinear interpolation; inference only (a target is refused).
    """

    @classmethod
    def like(cls, transform: GeneralizedRCNNTransform) -> "ExactResizeTransform":
        new = cls(transform.min_size, transform.max_size, transform.image_mean, transform.image_std,
                  transform.size_divisible, transform.fixed_size, _skip_resize=transform._skip_resize)
        return new.train(transform.training)

    def resize(
        self, image: Tensor, target: Optional[Dict[str, Tensor]] = None
    ) -> Tuple[Tensor, Optional[Dict[str, Tensor]]]:
        if target is not None:
            raise RuntimeError("ExactResizeTransform is for inference only")
        min_size, max_size = float(self.min_size[-1]), float(self.max_size)
        if torchvision._is_tracing():
            size = _traced_size(image, min_size, max_size)
        else:
            height, width = float(image.shape[-2]), float(image.shape[-1])
            scale = min(min_size / min(height, width), max_size / max(height, width))
            size = [int(math.floor(height * scale)), int(math.floor(width * scale))]
        image = torch.nn.functional.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]
        return image, target


def _require(fmt: str) -> None:
    """One clear error when the ONNX packages are missing (they are an optional extra)."""
    if fmt != "onnx":
        return
    missing = []
    for module in ("onnx", "onnxruntime"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise ExportError(f"--format onnx needs {' and '.join(missing)}, which are not installed: "
                          "pip install 'labelenc[export]'")


def check_supported(family: str, fmt: str, backbone: str | None = None) -> None:
    """Refuse an unknown format, or a family or backbone that cannot be exported to it (before anything is built or
    written)."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    for part in (family, backbone):
        if (part, fmt) in UNSUPPORTED:
            raise ExportError(f"{part} cannot be exported to {fmt}: {UNSUPPORTED[part, fmt]}")


def _postprocessor(detector: nn.Module) -> nn.Module:
    """The module holding ``score_thresh`` and ``detections_per_img`` (R-CNN: the ROI heads)."""
    return getattr(detector, "roi_heads", detector)


def _sibling(path: Path, tag: str) -> Path:
    return path.with_name(f"{path.stem}.{tag}{path.suffix}")


def _parity_images(val_set, model_cfg, count: int) -> tuple[list[Tensor], bool]:
    """Up to ``count`` validation images (plain float tensors), or seeded random ones if the split is empty."""
    if len(val_set):
        return [val_set[i][0].as_subclass(torch.Tensor) for i in range(min(count, len(val_set)))], False
    generator = torch.Generator().manual_seed(0)
    return [torch.rand(3, model_cfg.min_size, model_cfg.min_size, generator=generator) for _ in range(2)], True


def _trace_input(image: Tensor, min_size: int, max_size: int) -> Tensor:
    """``image`` resized to the detector's input resolution (short side ``min_size``, long side at most
    ``max_size``), the shape the ONNX graph is traced at."""
    h, w = image.shape[-2:]
    scale = min(min_size / min(h, w), max_size / max(h, w))
    size = (max(1, round(h * scale)), max(1, round(w * scale)))
    return torch.nn.functional.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]


def _metadata(cfg: Config, class_names: list[str], weights: Path, fmt: str, outputs: list[str], thresh: float) -> dict:
    call = ("model([image, ...]) -> (losses, detections); detections: one dict per image"
            if fmt == "torchscript" else "session.run(outputs, {'image': image}); one image per call")
    return {
        "family": cfg.model.family, "backbone": cfg.model.backbone, "class_names": class_names,
        "labels": "1..C: class_names[label - 1]; 0 is the background (RetinaNet / FCOS may return it with a low "
                  "score): skip it",
        "input": "image: float32 [3, H, W], RGB in [0, 1], any H and W (resized and normalised inside)",
        "outputs": outputs, "boxes": "x1, y1, x2, y2 in input-image pixels", "call": call,
        "score_thresh": thresh, "min_size": cfg.model.min_size, "max_size": cfg.model.max_size,
        "weights": str(weights), "labelenc_version": __version__,
    }


def _export_torchscript(detector: nn.Module, meta: dict, path: Path) -> None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.jit.script's deprecation notice
            scripted = torch.jit.script(detector)
    except Exception as err:  # the model uses something TorchScript cannot compile
        raise ExportError(f"{meta['family']} cannot be exported to torchscript: torch.jit.script failed: "
                          f"{str(err).strip().splitlines()[0]}") from None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.save's deprecation notice
        write_atomic(path, lambda f: torch.jit.save(scripted, f, _extra_files={METADATA: json.dumps(meta)}))


def _export_onnx(detector: nn.Module, meta: dict, image: Tensor, path: Path) -> None:
    import onnx

    outputs = meta["outputs"]
    buffer = io.BytesIO()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings of torchvision's ONNX paths, legacy-exporter notice
            torch.onnx.export(
                detector, ([image],), buffer, dynamo=False, opset_version=ONNX_OPSET, input_names=["image"],
                output_names=outputs, dynamic_axes={"image": {1: "height", 2: "width"},
                                                    **{name: {0: "detections"} for name in outputs}},
            )
    except Exception as err:
        raise ExportError(f"{meta['family']} cannot be exported to onnx: torch.onnx.export failed: "
                          f"{str(err).strip().splitlines()[0]}") from None
    model = onnx.load_from_string(buffer.getvalue())
    del buffer
    for key, value in meta.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value if isinstance(value, str) else json.dumps(value)
    onnx.checker.check_model(model)
    write_atomic(path, lambda f: f.write(model.SerializeToString()))


def _runner(fmt: str, path: Path, outputs: list[str]):
    """A function image -> detections dict running the exported file."""
    if fmt == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load's deprecation notice
            module = torch.jit.load(str(path), map_location="cpu")

        def run_torchscript(image: Tensor) -> dict[str, Tensor]:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # "always returns a (Losses, Detections) tuple"
                return module([image])[1][0]

        return run_torchscript
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # errors only
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def run_onnx(image: Tensor) -> dict[str, Tensor]:
        values = session.run(outputs, {"image": image.numpy()})
        return {name: torch.from_numpy(value) for name, value in zip(outputs, values)}

    return run_onnx


@dataclass
class _Comparison:
    matched: int = 0
    box: float = 0.0
    score: float = 0.0
    mask: float | None = None
    borderline: int = 0
    unmatched: list[str] = field(default_factory=list)


def compare_detections(ref: dict[str, Tensor], out: dict[str, Tensor], score_thresh: float, max_detections: int,
                       image: int, result: _Comparison) -> None:
    """Match the detections of one image by value (same label, box within BOX_TOL, score within SCORE_TOL) and add
    the largest differences of matched pairs and the detections left without a counterpart to ``result``."""
    rb, rs, rl = ref["boxes"].double(), ref["scores"].double(), ref["labels"]
    ob, os_, ol = out["boxes"].double(), out["scores"].double(), out["labels"]
    n, m = len(rb), len(ob)
    pairs: list[tuple[int, int]] = []
    if n and m:
        box_d = (rb[:, None, :] - ob[None, :, :]).abs().amax(-1)
        score_d = (rs[:, None] - os_[None, :]).abs()
        cost = torch.maximum(box_d / BOX_TOL, score_d / SCORE_TOL)
        cost[rl[:, None] != ol[None, :]] = float("inf")
        flat = cost.flatten()
        candidates = torch.nonzero(flat <= 1).flatten()
        used_r, used_o = set(), set()
        for k in candidates[torch.argsort(flat[candidates], stable=True)].tolist():
            i, j = divmod(k, m)
            if i not in used_r and j not in used_o:
                used_r.add(i), used_o.add(j), pairs.append((i, j))
        for i, j in pairs:
            result.box = max(result.box, float(box_d[i, j]))
            result.score = max(result.score, float(score_d[i, j]))
        if "masks" in ref and pairs:
            ri, oj = zip(*pairs)
            diff = float((ref["masks"][list(ri)] - out["masks"][list(oj)]).abs().max())
            result.mask = max(result.mask or 0.0, diff)
    result.matched += len(pairs)
    matched_r, matched_o = {i for i, _ in pairs}, {j for _, j in pairs}
    for side, boxes, scores, labels, matched, count in (("PyTorch", rb, rs, rl, matched_r, n),
                                                        ("exported", ob, os_, ol, matched_o, m)):
        cutoff = max(score_thresh, float(scores.min()) if count >= max_detections else score_thresh)
        for i in range(count):
            if i in matched:
                continue
            if float(scores[i]) <= cutoff + SCORE_TOL:
                result.borderline += 1
                continue
            box = ", ".join(f"{v:.2f}" for v in boxes[i].tolist())
            result.unmatched.append(f"image {image}: {side} detection label {int(labels[i])} score "
                                    f"{float(scores[i]):.4f} box [{box}]")


def export_detector(cfg: Config, weights: str | Path, fmt: str, out: str | Path,
                    score_thresh: float | None = None, parity_images: int = PARITY_IMAGES) -> ExportReport:
    """Export the detector of ``cfg`` with ``weights`` to ``out`` as ``fmt`` and check it against PyTorch.

    ``score_thresh`` replaces the detector's score threshold (torchvision's: RetinaNet and Faster / Mask R-CNN 0.05,
    FCOS 0.2) in the model and so in the exported file. Errors that leave nothing written: an unknown or unsupported
    format (:class:`ExportError`), missing ONNX packages, a weights file that does not fit the config, a model the
    exporter cannot handle. A failed parity check renames the file (see the module docstring) and returns a report
    with ``passed=False``.
    """
    start = time.perf_counter()
    weights, out = Path(weights), Path(out)
    check_supported(cfg.model.family, fmt, cfg.model.backbone)
    _require(fmt)
    if out.is_dir():
        raise UserError(f"--out {out} is a directory; give the file to write, e.g. {out / ('detector' + SUFFIX[fmt])}")
    train_set, val_set = build_datasets(cfg, with_masks=False)
    detector = build_detector(cfg.model.model_copy(update={"backbone_weights": None}),
                              runner.num_classes_of(cfg, train_set))
    runner.load_detector_weights(detector, weights, cfg, train_set.class_names)
    detector.eval()
    post = _postprocessor(detector)
    if score_thresh is not None:
        post.score_thresh = float(score_thresh)
    thresh, max_detections = float(post.score_thresh), int(post.detections_per_img)
    if fmt == "onnx":
        size = sum(t.numel() * t.element_size() for t in detector.state_dict().values())
        if size > ONNX_MAX_BYTES:
            raise ExportError(f"{cfg.model.family} with {cfg.model.backbone} cannot be exported to onnx: its "
                              f"{size / 2**30:.2f} GiB of weights exceed the 2 GiB limit of one ONNX file")

    images, random_images = _parity_images(val_set, cfg.model, parity_images)
    trace_image = _trace_input(images[0], cfg.model.min_size, cfg.model.max_size)
    with torch.no_grad():
        try:
            reference = [detector([image])[0] for image in images]
            outputs = list(detector([trace_image])[0])
        except Exception as err:
            raise UserError(f"the PyTorch {cfg.model.family} itself fails on one {tuple(images[0].shape)} image: "
                            f"{str(err).strip().splitlines()[0]}") from None
    meta = _metadata(cfg, train_set.class_names, weights, fmt, outputs, thresh)
    detector.transform = ExactResizeTransform.like(detector.transform)  # the reference above ran torchvision's
    detector.eval()

    unverified, failed = _sibling(out, "unverified"), _sibling(out, "parity-failed")
    with torch.no_grad():
        if fmt == "torchscript":
            _export_torchscript(detector, meta, unverified)
        else:
            _export_onnx(detector, meta, trace_image, unverified)
        try:
            run = _runner(fmt, unverified, outputs)
            result = _Comparison()
            for k, (image, ref) in enumerate(zip(images, reference)):
                compare_detections(ref, run(image), thresh, max_detections, k, result)
        except BaseException:
            unverified.unlink(missing_ok=True)
            raise
    passed = not result.unmatched
    final = out if passed else failed
    os.replace(unverified, final)
    if passed:
        failed.unlink(missing_ok=True)  # an earlier failed attempt is superseded
    report = ExportReport(final, fmt, cfg.model.family, passed, len(images), result.matched, result.box,
                          result.score, result.mask, result.borderline, result.unmatched, thresh,
                          time.perf_counter() - start, random_images)
    logger.info("exported %s to %s: %s", cfg.model.family, final, "PASS" if passed else "FAIL")
    return report
