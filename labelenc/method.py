"""LabelEnc (Hao et al., ECCV 2020): the two training objectives, to read next to the paper.

A detector is ``transform → backbone f (with FPN) → head d``. Step 1 (Eq. 9) learns a label encoding function
h — an autoencoder in label space whose decoder is the detection head — jointly with an ordinary detector:

    L1 = L_det(d(h(y)), y)            reconstruction through the shared head   (``reconstruction_*`` losses)
    L2 = λ1 · L_det(d(f(I)), y)       the detector's own losses                 (the detector's loss names)
    L3 = λ2 · L_dis(f(I), h(y))       no gradient into h                        (``feature_distance``)

Step 2 (Eq. 7) trains a fresh detector with its own losses plus λ · L_dis(f(I), h(y)) towards the frozen h
(:class:`LabelEncoderTarget`; any module mapping the transformed batch to backbone-shaped features can stand in, such
as a trained teacher's backbone for knowledge distillation, :class:`TeacherTarget`). :class:`ReconstructionOnly` is
the Step 1 of the paper's Table-2 ablation: L1 alone, with no image backbone.
L_dis (Eq. 10) is ``‖LN(A(x_f)) − LN(x_h)‖²`` with a small adaption net A and a per-level layer norm.
Weights live in ``loss_weights``; a zero weight skips the term's computation (Step-1 warm-up, Step-2 cut-off).
docs/method.md maps every equation to the code and says where this implementation differs from the authors'.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection.image_list import ImageList

from labelenc.encoder import LabelEncoder
from labelenc.labelmap import render_label_maps
from labelenc.models import family_of, head_losses

Features = OrderedDict[str, Tensor]


class FeatureAdaption(nn.Module):
    """A of Eq. 10: conv3x3 → ReLU → conv3x3 → ReLU → conv3x3, one net shared by all pyramid levels."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, 3, padding=1),
        )

    def forward(self, features: Features) -> Features:
        return OrderedDict((k, self.net(v)) for k, v in features.items())


def loss_feature_distance(adapted: Features, encoded: Features) -> Tensor:
    """Eq. 10: MSE between per-level layer-normalised features, all levels concatenated (target detached).

    Computed in (at least) float32 under mixed precision: the normalisation's statistics and the mean of squares
    lose too much in 16 bits.
    """
    device_type = next(iter(adapted.values())).device.type
    with torch.autocast(device_type, enabled=False):
        student = torch.cat([F.group_norm(_at_least_float32(x), 1).flatten(1) for x in adapted.values()], dim=1)
        target = torch.cat([F.group_norm(_at_least_float32(x.detach()), 1).flatten(1) for x in encoded.values()], dim=1)
        return F.mse_loss(student, target)


def _at_least_float32(x: Tensor) -> Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def label_maps_of(
    images: ImageList, targets: list[dict[str, Tensor]], num_classes: int, box_jitter: bool, with_masks: bool
) -> tuple[Tensor, Tensor]:
    """Compact label maps of a transformed batch: ``([N, K, H, W], classes[K])`` for the K classes present."""
    labels = [t["labels"] - 1 for t in targets]  # detector labels are 1..C, label-map channels 0..C-1
    classes = torch.unique(torch.cat(labels))
    height, width = images.tensors.shape[-2:]
    device_type = images.tensors.device.type
    # under mixed precision the maps are made in the autocast dtype, which h's convolutions run in anyway
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else images.tensors.dtype
    maps = render_label_maps(
        [t["boxes"] for t in targets],
        labels,
        num_classes,
        height,
        width,
        masks=[t["masks"] for t in targets] if with_masks else None,
        box_jitter=box_jitter,
        classes=classes,
        dtype=dtype,
    )
    return maps, classes


class _DetectorObjective(nn.Module):
    """Shared plumbing: run the detector's transform and backbone once, name and weight the loss terms."""

    def __init__(self, detector: nn.Module, loss_weights: dict[str, float]) -> None:
        super().__init__()
        self.detector = detector
        self.loss_weights = dict(loss_weights)
        self.with_masks = family_of(detector).with_masks

    def encode_inputs(self, images: list[Tensor], targets: list[dict[str, Tensor]]):
        image_list, targets = self.detector.transform(images, targets)
        return image_list, targets, self.detector.backbone(image_list.tensors)

    def weighted(self, name: str, losses: dict[str, Tensor], prefix: str = "") -> dict[str, Tensor]:
        weight = self.loss_weights[name]
        return {prefix + k: weight * v for k, v in losses.items()}


class Baseline(_DetectorObjective):
    """The plain detector's own objective (the baseline runs)."""

    def __init__(self, detector: nn.Module) -> None:
        super().__init__(detector, {"detection": 1.0})

    def forward(self, images: list[Tensor], targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        return self.weighted("detection", self.detector(images, targets))


class Step1(_DetectorObjective):
    """Eq. 9: detector and label encoder h trained together through one shared head."""

    def __init__(
        self,
        detector: nn.Module,
        encoder: LabelEncoder,
        reconstruction_weight: float = 1.0,
        detection_weight: float = 1.0,
        distance_weight: float = 1.0,
        box_jitter: bool = True,
    ) -> None:
        super().__init__(
            detector,
            {"reconstruction": reconstruction_weight, "detection": detection_weight, "distance": distance_weight},
        )
        self.encoder = encoder
        self.adaption = FeatureAdaption(encoder.out_channels)
        self.box_jitter = box_jitter

    def forward(self, images: list[Tensor], targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        image_list, targets, features = self.encode_inputs(images, targets)
        maps, classes = label_maps_of(image_list, targets, self.encoder.num_classes, self.box_jitter, self.with_masks)
        encoded = self.encoder(maps, classes)
        losses = self.weighted("detection", head_losses(self.detector, image_list, features, targets))
        recon = head_losses(self.detector, image_list, encoded, targets)
        losses.update(self.weighted("reconstruction", recon, prefix="reconstruction_"))
        if self.loss_weights["distance"]:
            distance = {"feature_distance": loss_feature_distance(self.adaption(features), encoded)}
            losses.update(self.weighted("distance", distance))
        return losses


class ReconstructionOnly(_DetectorObjective):
    """Step 1 with L1 alone (paper, Table 2): h and the head(s) learn to reconstruct the labels, with no image backbone.

    The detector's backbone is dropped (set to None): the objective's parameters are h's (with its FPN) and the
    head(s)', and the detector serves only its transform and head(s).
    """

    def __init__(
        self, detector: nn.Module, encoder: LabelEncoder, reconstruction_weight: float = 1.0, box_jitter: bool = True
    ) -> None:
        detector.backbone = None
        super().__init__(detector, {"reconstruction": reconstruction_weight})
        self.encoder = encoder
        self.box_jitter = box_jitter

    def forward(self, images: list[Tensor], targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        image_list, targets = self.detector.transform(images, targets)
        maps, classes = label_maps_of(image_list, targets, self.encoder.num_classes, self.box_jitter, self.with_masks)
        recon = head_losses(self.detector, image_list, self.encoder(maps, classes), targets)
        return self.weighted("reconstruction", recon, prefix="reconstruction_")


class LabelEncoderTarget(nn.Module):
    """The paper's target h(y): label maps of the transformed batch through a frozen label encoder h."""

    def __init__(self, encoder: LabelEncoder, with_masks: bool = False) -> None:
        super().__init__()
        self.encoder = encoder
        self.with_masks = with_masks
        self.out_channels = encoder.out_channels

    def forward(self, images: ImageList, targets: list[dict[str, Tensor]]) -> Features:
        maps, classes = label_maps_of(images, targets, self.encoder.num_classes, False, self.with_masks)
        return self.encoder(maps, classes)


class TeacherTarget(nn.Module):
    """Knowledge distillation's target (paper, Table 6): a trained teacher's backbone + FPN features of the batch."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.out_channels = backbone.out_channels

    def forward(self, images: ImageList, targets: list[dict[str, Tensor]]) -> Features:
        return self.backbone(images.tensors)


class Step2(_DetectorObjective):
    """Eq. 7: a detector trained with its own losses plus the distance to the features of a frozen ``target``.

    ``target(image_list, targets)`` maps the transformed batch to a feature dict with the detector backbone's keys
    and shapes (:class:`LabelEncoderTarget` for LabelEnc, :class:`TeacherTarget` for distillation). It is frozen,
    kept in eval mode and run without gradient.
    """

    def __init__(self, detector: nn.Module, target: nn.Module, distance_weight: float = 1.0) -> None:
        super().__init__(detector, {"detection": 1.0, "distance": distance_weight})
        self.target = target.requires_grad_(False).eval()
        self.adaption = FeatureAdaption(target.out_channels)

    def train(self, mode: bool = True) -> Step2:
        super().train(mode)
        self.target.eval()
        return self

    def forward(self, images: list[Tensor], targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        image_list, targets, features = self.encode_inputs(images, targets)
        losses = self.weighted("detection", head_losses(self.detector, image_list, features, targets))
        if self.loss_weights["distance"]:
            with torch.no_grad():
                encoded = self.target(image_list, targets)
            distance = {"feature_distance": loss_feature_distance(self.adaption(features), encoded)}
            losses.update(self.weighted("distance", distance))
        return losses
