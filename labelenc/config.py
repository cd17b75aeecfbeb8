"""Typed run configuration: YAML files validated by pydantic, with ``a.b=c`` command-line overrides."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from labelenc.encoder import H_INITS
from labelenc.engine.optim import OPTIMIZERS
from labelenc.errors import UserError
from labelenc.fileio import write_text_atomic
from labelenc.models.backbones import BACKBONES
from labelenc.models.detectors import FAMILIES, HEAD_NORMS


class ConfigError(UserError, ValueError):
    """A configuration file or override that cannot be used; the message names the key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Strict):
    family: Literal[tuple(FAMILIES)] = "retinanet"  # the registries are the one list of allowed names
    backbone: Literal[tuple(BACKBONES)] = "resnet50"
    backbone_weights: str | None = Field(
        None,
        description="None: random init; a path to a state-dict file; or a torchvision weights name of the backbone "
        "such as 'IMAGENET1K_V1', read from the torch cache (torch.hub.get_dir(), moved by TORCH_HOME) and "
        "downloaded there by torchvision when missing, unless model.download is false or LABELENC_OFFLINE is set.",
    )
    download: bool = Field(
        True,
        description="Whether a torchvision weights name missing from the torch cache may be downloaded; false (or "
        "the environment variable LABELENC_OFFLINE=1) makes a missing file an error naming the URL and the path.",
    )
    trainable_layers: int | None = Field(
        None, ge=0, description="None: torchvision's default (all layers from random init, 3 with pretrained weights)."
    )
    frozen_bn: bool | None = Field(
        None,
        description="Backbone normalisation: true FrozenBatchNorm (the loaded statistics and affine, fixed; from "
        "random init that is the identity), false BatchNorm (batch statistics, trained affine); None: torchvision's "
        "rule, FrozenBatchNorm with backbone_weights and BatchNorm from random init.",
    )
    fpn_channels: int = Field(256, ge=8)
    p6_from: Literal["p5", "c5"] = Field(
        "p5",
        description="RetinaNet / FCOS: the input of the extra P6 level (P7 follows from P6); p5: torchvision's "
        "choice, c5: the authors' (their USE_C5). The label encoder h follows the detector.",
    )
    head_norm: Literal[HEAD_NORMS] | None = Field(
        None,
        description="Normalisation in the detection head's convolution tower: 'group' puts GroupNorm(32) after each "
        "3x3 convolution (as torchvision's retinanet_resnet50_fpn_v2 head and FCOS's head; model.fpn_channels must "
        "then be a multiple of 32), 'none' keeps plain convolutions (torchvision's RetinaNet head). None: the "
        "family's torchvision default (RetinaNet none, FCOS group, Faster/Mask R-CNN none). RetinaNet takes either; "
        "FCOS only group; Faster/Mask R-CNN only none (their RPN and RoI heads are not changed). Only the head's "
        "normalisation: v2's GIoU box loss is not applied, and its P6 from C5 is model.p6_from.",
    )
    min_size: int = Field(800, ge=32, description="Short side after the detector's resize.")
    max_size: int = Field(1333, ge=32, description="Long-side limit after the detector's resize.")
    num_classes: int | None = Field(None, ge=1, description="None: taken from the training data.")
    anchor_sizes: list[int] | None = Field(
        None,
        description="Base anchor size per pyramid level (RetinaNet, Faster/Mask R-CNN); None: torchvision's "
        "defaults (32..512, sized for 800-pixel images). FCOS places points by stride and takes none.",
    )
    detections_per_image: int = Field(100, ge=1)
    detector_kwargs: dict[str, bool | int | float] = Field(
        default_factory=dict,
        description="Further numeric settings of torchvision's detector constructor, by its own keyword names: "
        "e.g. Faster R-CNN's box_batch_size_per_image or rpn_post_nms_top_n_test (torchvision's defaults are sized "
        "for 800-pixel images), RetinaNet's fg_iou_thresh, FCOS's center_sampling_radius. Only keywords whose "
        "default is a number or a bool; those set by other model fields (sizes, detections per image) are refused.",
    )
    channels_last: bool = Field(False, description="Train in channels-last memory format (faster convolutions "
                                "on recent GPUs with AMP); the weights are the same.")

    @model_validator(mode="after")
    def _check_family_options(self) -> ModelConfig:
        errors = FAMILIES[self.family].config_errors(self)
        most = BACKBONES[self.backbone].max_trainable_layers
        if self.trainable_layers is not None and self.trainable_layers > most:
            errors.append(f"model.trainable_layers must be at most {most} for {self.backbone}")
        if errors:
            raise ValueError("; ".join(errors))
        return self


_SPLIT_KEYS = {"coco": ("annotations", "images"), "voc": ("root", "split", "class_names"),
               "yolo": ("root", "split", "class_names")}


class SplitConfig(_Strict):
    format: Literal["coco", "voc", "yolo"] = Field(
        "coco", description="coco: annotations + images; voc: root [+ split]; yolo: root [+ split] [+ class_names]."
    )
    annotations: str | None = Field(None, description="coco: the COCO-format JSON file.")
    images: str | None = Field(None, description="coco: folder the JSON's file_name entries are relative to.")
    root: str | None = Field(
        None,
        description="voc: a VOC year folder (Annotations/, JPEGImages/, ImageSets/Main/); "
        "yolo: the folder holding images/ and labels/.",
    )
    split: str | None = Field(
        None,
        description="voc: ImageSets/Main/<split>.txt lists the images (None: all of Annotations/); "
        "yolo: images/<split> and labels/<split> (None: images/ and labels/ themselves).",
    )
    class_names: list[str] | None = Field(
        None,
        min_length=1,
        description="voc / yolo: the classes, category ids 1..C in this order (yolo: by class index). None: "
        "voc infers the sorted object names (a val split takes the training classes); yolo reads "
        "root/classes.txt or the names of root/data.yaml.",
    )

    @model_validator(mode="after")
    def _check_format_keys(self) -> SplitConfig:
        allowed = _SPLIT_KEYS[self.format]
        required = allowed[:2] if self.format == "coco" else allowed[:1]
        missing = [k for k in required if getattr(self, k) is None]
        if missing:
            raise ValueError(f"format {self.format!r} needs {' and '.join(missing)} (it takes {', '.join(allowed)})")
        keys = _SPLIT_KEYS["coco"] + _SPLIT_KEYS["voc"]
        extra = [k for k in keys if k not in allowed and getattr(self, k) is not None]
        if extra:
            raise ValueError(f"format {self.format!r} does not take {', '.join(extra)} (it takes {', '.join(allowed)})")
        if self.class_names is not None and len(set(self.class_names)) != len(self.class_names):
            raise ValueError(f"class_names lists a name more than once: {self.class_names}")
        return self


class DataConfig(_Strict):
    train: SplitConfig
    val: SplitConfig
    flip_prob: float = Field(0.5, ge=0.0, le=1.0)
    num_workers: int = Field(2, ge=0)
    strict: bool = Field(False, description="Data warnings (clipped or dropped boxes) stop the run like errors.")
    aspect_ratio_grouping: bool = Field(
        False,
        description="Every global batch holds images of one orientation only (width >= height, or width < height, "
        "from the annotations' image sizes), as detectron2 and maskrcnn-benchmark batch: less padding, so smaller "
        "feature and label maps. No image is dropped or repeated (see labelenc.data.loader). Off by default so that "
        "existing runs stay bit-identical; detectron2 groups by default.",
    )


class TrainConfig(_Strict):
    base_iters: int = Field(90000, ge=1, description="Length of the 1x schedule in iterations.")
    schedule: Literal["1x", "2x"] = "1x"
    batch_size: int = Field(16, ge=1, description="Images per iteration over all processes.")
    base_lr: float = Field(0.01, gt=0, description="Learning rate for reference_batch_size images.")
    reference_batch_size: int = Field(16, ge=1)
    optimizer: Literal[tuple(OPTIMIZERS)] = Field(
        "sgd", description="sgd (the paper's) or adamw (momentum does not apply; use a weight decay such as 0.05).",
    )
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum.")
    weight_decay: float = Field(1e-4, ge=0)
    bias_lr_factor: float = Field(1.0, gt=0, description="LR multiplier of bias parameters (the authors' recipe: 2).")
    bias_weight_decay: float | None = Field(
        None, ge=0, description="Weight decay of bias parameters; None: train.weight_decay (the authors' recipe: 0).",
    )
    warmup_iters: int = Field(1000, ge=0, description="Linear LR warm-up length.")
    warmup_factor: float = Field(0.001, gt=0, le=1)
    lr_decay_points: tuple[float, float] = Field(
        (2 / 3, 8 / 9), description="LR x0.1 at these fractions of the schedule."
    )
    grad_clip: float | None = Field(None, gt=0, description="Max global gradient norm; None: no clipping.")
    ema_decay: float | None = Field(
        None, gt=0, lt=1, description="Keep an exponential moving average of the detector's weights (this decay per "
        "iteration: about 1 - 1/(its horizon in iterations), e.g. 0.99 for a few hundred iterations, 0.9998 for "
        "90k) and save and evaluate it instead of the last weights; None: the last weights.",
    )
    max_bad_steps: int = Field(
        5, ge=1, description="Iterations with a non-finite loss are skipped; this many in a row end the run."
    )
    checkpoint_period: int = Field(5000, ge=1)
    keep_checkpoints: int | None = Field(
        None, ge=1, description="Keep only the newest N periodic checkpoints (older ones are deleted as new ones are "
        "written); None keeps them all, as detectron2 does.",
    )
    log_period: int = Field(20, ge=1)
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int | None = Field(
        None, ge=1, description="CPU threads of the run (torch.set_num_threads) while it trains and evaluates; None: "
        "the process's own (all cores, or the cores shared out by --jobs). CPU results depend on the thread count, "
        "so a config that sets it gives the same numbers however its runs are launched.",
    )
    amp: Literal["off", "bf16", "fp16"] = Field(
        "off", description="Mixed precision: bf16 autocast (CUDA and CPU), or fp16 autocast with a gradient scaler "
        "(CUDA; its overflowing steps are skipped). YAML's false/true read as off/bf16.",
    )
    deterministic: bool = Field(False, description="torch.use_deterministic_algorithms for exact resume.")

    @field_validator("amp", mode="before")
    @classmethod
    def _amp_from_yaml_bool(cls, value: object) -> object:  # YAML 1.1 reads `amp: off` as False
        return {False: "off", True: "bf16"}.get(value, value) if isinstance(value, bool) else value

    @model_validator(mode="after")
    def _check_decays(self) -> TrainConfig:
        first, second = self.lr_decay_points
        if not 0 < first <= second < 1:
            raise ValueError("train.lr_decay_points must satisfy 0 < first <= second < 1")
        return self

    @property
    def schedule_multiplier(self) -> int:
        return {"1x": 1, "2x": 2}[self.schedule]

    @property
    def max_iters(self) -> int:
        return self.base_iters * self.schedule_multiplier

    def decay_milestones(self, length: int, offset: int = 0) -> list[int]:
        """LR decay iterations for a schedule of ``length`` iterations that starts after ``offset`` iterations."""
        return [offset + round(f * length) for f in self.lr_decay_points]


class LabelEncConfig(_Strict):
    encoder_width: float = Field(1.0, gt=0, description="Channel multiplier of the label encoder h (1.0 = paper).")
    step1_warmup: float = Field(
        1 / 3, ge=0, description="Step-1 warm-up without L3, as a fraction of the 1x length (paper: 30k of 90k)."
    )
    distance_cutoff: float = Field(
        1 / 9, ge=0, lt=1, description="Fraction at the end of Step 2 without the distance loss (paper: 10k of 90k)."
    )
    reconstruction_weight: float = Field(1.0, ge=0, description="Step 1: weight of L1 = L_det(d(h(y)), y).")
    detection_weight: float = Field(1.0, ge=0, description="Step 1: lambda_1 of L2 = L_det(d(f(I)), y).")
    distance_weight: float = Field(1.0, ge=0, description="lambda (Step 2) and lambda_2 (Step 1) of L_dis.")
    box_jitter: bool = Field(True, description="Step 1: random per-box down-scaling of label maps.")
    h_init: Literal[tuple(H_INITS)] = Field(
        "kaiming_normal",
        description="Step 1: initialisation of h's body. kaiming_normal: every convolution kaiming_normal_ (fan_out, "
        "ReLU) with zero biases; authors: as the authors' code, kaiming_uniform_(a=1) on the bottleneck and shortcut "
        "convolutions, PyTorch's default for the stem and every bias.",
    )


class Config(_Strict):
    model: ModelConfig = ModelConfig()
    data: DataConfig
    train: TrainConfig = TrainConfig()
    labelenc: LabelEncConfig = LabelEncConfig()
    output_dir: str = "runs/default"


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid configuration ({source}):"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            parent = e["loc"][:-1]
            allowed = _allowed_keys(parent)
            msg = f"unknown key; allowed keys here: {', '.join(allowed)}"
        elif e["type"] == "missing":
            msg = "required key is missing"
        lines.append(f"  {key}: {msg}")
    return "\n".join(lines)


def _allowed_keys(path: tuple) -> list[str]:
    model: type[BaseModel] = Config
    for part in path:
        field = model.model_fields.get(str(part))
        annotation = field.annotation if field else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return sorted(model.model_fields)


def _parse_value(text: str) -> Any:
    """YAML scalar parsing, so ``x=1e-3``, ``x=null`` and ``x=[1,2]`` mean what they say."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Return a copy of ``raw`` with ``a.b=c`` overrides applied (values parsed as YAML)."""
    raw = copy.deepcopy(raw)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key.sub=value")
        node = raw
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
            node = child
        node[parts[-1]] = _parse_value(value)
    return raw


def build_config(raw: dict, source: str = "<dict>") -> Config:
    """Validate a raw mapping into a :class:`Config`, turning pydantic errors into one readable message."""
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, source)) from None


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Read a YAML config file, apply overrides and validate it."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"config file {path} is not a readable text file: {err}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return build_config(apply_overrides(raw, overrides or []), source=str(path))


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved configuration as YAML (what the run actually used)."""
    write_text_atomic(path, yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
