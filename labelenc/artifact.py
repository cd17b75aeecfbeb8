"""The label-encoder artifact that Step 1 writes and Step 2 reads: h with its FPN, the head, and what they fit."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from torch import nn

from labelenc.encoder import LabelEncoder, level_channels
from labelenc.errors import UserError
from labelenc.engine.checkpoint import CheckpointError, load_file, save_file
from labelenc.models import FAMILIES, family_of

logger = logging.getLogger(__name__)


class IncompatibleLabelEncoder(UserError, ValueError):
    """A label encoder trained for another detector family, class list or pyramid."""


# Metadata keys added since the first artifacts, with the value that those artifacts were built with.
_META_DEFAULTS = {"p6_from": lambda meta: "p5", "h_init": lambda meta: "kaiming_normal",
                  "head_norm": lambda meta: FAMILIES[meta["family"]].head_norms[0]}
_COMPATIBLE_KEYS = ("family", "class_names", "returned_layers", "fpn_channels", "p6_from", "head_norm")


def encoder_metadata(
    family: str,
    class_names: list[str],
    fpn_channels: int,
    width: float,
    backbone: str | None,
    *,
    p6_from: str = "p5",
    head_norm: str | None = None,
    h_init: str = "kaiming_normal",
) -> dict:
    """What a Step-2 detector must share with the Step-1 run, and how h was built.

    ``backbone`` is informative (it may differ in Step 2; None: Step 1 had none); ``p6_from`` is ``model.p6_from`` (h's FPN takes P6
    from the same level as the detector's); ``head_norm`` is the head's normalisation as built (None: the
    family's default), so that the Step-1 head loads into the Step-2 detector; ``h_init`` is ``labelenc.h_init``,
    how Step 1 initialised h.
    """
    return {
        "family": family,
        "class_names": list(class_names),
        "num_classes": len(class_names),
        "returned_layers": list(FAMILIES[family].returned_layers),
        "fpn_channels": fpn_channels,
        "p6_from": p6_from,
        "head_norm": head_norm if head_norm is not None else FAMILIES[family].head_norms[0],
        "encoder_width": width,
        "h_init": h_init,
        "step1_backbone": backbone,
    }


def _meta(meta: dict, key: str) -> Any:
    """``meta[key]``, or for a key that an older artifact lacks, the value it was built with."""
    return meta[key] if key in meta else _META_DEFAULTS[key](meta)


def save_label_encoder(path: str | Path, encoder: LabelEncoder, detector: nn.Module, meta: dict, config: dict) -> None:
    """Write h (body + FPN), the detection head(s) and the metadata to ``path``."""
    heads = {name: getattr(detector, name).state_dict() for name in family_of(detector).head_modules}
    save_file({"kind": "label_encoder", "encoder": encoder.state_dict(), "heads": heads, "meta": meta,
               "config": config}, path)


def load_label_encoder(path: str | Path) -> dict[str, Any]:
    """Read an artifact written by :func:`save_label_encoder` (tensors and plain data only)."""
    artifact = load_file(path, kind="label encoder")
    if artifact.get("kind") != "label_encoder":
        raise CheckpointError(f"{path} is not a label-encoder file (it holds a {artifact.get('kind', 'checkpoint')})")
    return artifact


def check_compatible(meta: dict, expected: dict, source: str) -> None:
    """Refuse an artifact whose family, classes or pyramid differ from the Step-2 run's, saying what differs."""
    diffs = [f"{k}: label encoder has {_meta(meta, k)!r}, this run has {_meta(expected, k)!r}"
             for k in _COMPATIBLE_KEYS if _meta(meta, k) != _meta(expected, k)]
    if diffs:
        raise IncompatibleLabelEncoder(f"label encoder {source} does not fit this detector:\n  " + "\n  ".join(diffs))


def build_label_encoder(meta: dict) -> LabelEncoder:
    """An untrained h with the architecture and initialisation recorded in ``meta``."""
    family = FAMILIES[meta["family"]]
    returned_layers = list(family.returned_layers)
    c5_channels = level_channels(returned_layers, meta["encoder_width"])[-1] if _meta(meta, "p6_from") == "c5" else None
    return LabelEncoder(
        meta["num_classes"],
        meta["fpn_channels"],
        returned_layers,
        family.extra_blocks(meta["fpn_channels"], c5_channels),
        width=meta["encoder_width"],
        init=_meta(meta, "h_init"),
    )


def encoder_from_artifact(artifact: dict) -> LabelEncoder:
    """The trained h stored in an artifact, ready to be frozen in Step 2."""
    encoder = build_label_encoder(artifact["meta"])
    encoder.load_state_dict(artifact["encoder"])
    return encoder


def init_detector_from_artifact(detector: nn.Module, artifact: dict) -> dict[str, list[str]]:
    """Step-2 initialisation: the head(s) strictly from Step 1, and the FPN tensors of h whose shapes match.

    Returns ``{"copied": [...], "skipped": [...]}`` of FPN tensor names (layers whose tensors all match are copied
    whole); a head that does not load is an error.
    """
    for name, state in artifact["heads"].items():
        try:
            getattr(detector, name).load_state_dict(state, strict=True)
        except RuntimeError as err:
            raise IncompatibleLabelEncoder(f"the Step-1 {name} does not load into this detector: {err}") from None
    fpn = detector.backbone.fpn.state_dict()
    source = {k[len("fpn."):]: v for k, v in artifact["encoder"].items() if k.startswith("fpn.")}
    layers: dict[str, list[str]] = {}
    for key in fpn:  # a layer is copied whole or not at all (a bias without its weight means nothing)
        layers.setdefault(key.rsplit(".", 1)[0], []).append(key)
    copied = [
        k
        for keys in layers.values()
        if all(k in source and source[k].shape == fpn[k].shape for k in keys)
        for k in keys
    ]
    skipped = sorted(set(fpn) - set(copied))
    detector.backbone.fpn.load_state_dict({**fpn, **{k: source[k] for k in copied}})
    logger.info("Step-2 init: loaded %s from the label encoder", ", ".join(artifact["heads"]))
    logger.info("Step-2 init: FPN tensors copied from h: %s", ", ".join(copied) or "none")
    logger.info("Step-2 init: FPN tensors left at their initialisation (shape differs): %s", ", ".join(skipped) or "none")
    return {"copied": copied, "skipped": skipped}
