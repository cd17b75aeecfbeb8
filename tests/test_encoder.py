"""Tests for the label encoding function h (labelenc/encoder.py), and h as built from artifact metadata."""

import math

import pytest
import torch
from torch import nn
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7

from labelenc.artifact import (
    IncompatibleLabelEncoder,
    build_label_encoder,
    check_compatible,
    encoder_metadata,
    init_detector_from_artifact,
)
from labelenc.encoder import LabelEncoder, level_channels
from labelenc.models import build_detector

NUM_CLASSES = 6
TINY = 1 / 16

RETINANET_FCOS = ([2, 3, 4], lambda c: LastLevelP6P7(c, c))
RCNN = ([1, 2, 3, 4], lambda c: LastLevelMaxPool())


@pytest.mark.parametrize("returned_layers, extra", [RETINANET_FCOS, RCNN], ids=["p6p7", "maxpool"])
def test_keys_shapes_and_fpn_weights_match_torchvision_backbone(returned_layers, extra) -> None:
    """h(y) has the detector backbone's keys and shapes; its FPN output convs and extra blocks fit the detector's."""
    torch.manual_seed(0)
    encoder = LabelEncoder(NUM_CLASSES, 256, returned_layers, extra(256), width=TINY)
    backbone = resnet_fpn_backbone(
        backbone_name="resnet18",
        weights=None,
        trainable_layers=5,
        returned_layers=returned_layers,
        extra_blocks=extra(256),
    ).eval()
    assert encoder.out_channels == backbone.out_channels == 256
    for h, w in [(64, 64), (72, 88)]:
        with torch.no_grad():
            ours = encoder(torch.rand(2, NUM_CLASSES, h, w))
            theirs = backbone(torch.rand(2, 3, h, w))
        assert list(ours) == list(theirs)
        assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    # inner_blocks depend on the body's channels; layer_blocks and extra blocks are what Step 2 copies.
    def copied(fpn: nn.Module) -> dict[str, torch.Size]:
        return {k: v.shape for k, v in fpn.state_dict().items() if not k.startswith("inner_blocks")}

    assert copied(encoder.fpn) == copied(backbone.fpn)


def test_body_strides_without_fpn() -> None:
    """C2..C5 come out at strides 4, 8, 16, 32, keyed in returned_layers order, after a ReLU."""
    encoder = LabelEncoder(NUM_CLASSES, 8, [1, 2, 3, 4], None, width=TINY)
    feats = encoder.body(torch.rand(1, NUM_CLASSES, 64, 128))
    assert {k: tuple(v.shape[2:]) for k, v in feats.items()} == {
        "0": (16, 32),
        "1": (8, 16),
        "2": (4, 8),
        "3": (2, 4),
    }
    assert all((f >= 0).all() for f in feats.values())  # every bottleneck ends in ReLU
    assert list(encoder(torch.rand(1, NUM_CLASSES, 64, 64))) == ["0", "1", "2", "3"]


def test_unused_stages_are_not_built() -> None:
    """Like torchvision's IntermediateLayerGetter, stages past the last returned one are dropped."""
    encoder = LabelEncoder(NUM_CLASSES, 8, [1, 2], None, width=TINY)
    assert not hasattr(encoder.body, "layer3") and not hasattr(encoder.body, "layer4")


@pytest.mark.parametrize("returned_layers", [[], [0, 1], [3, 2], [2, 2, 3], [1, 5]])
def test_invalid_returned_layers_raise(returned_layers) -> None:
    with pytest.raises(ValueError, match="returned_layers"):
        LabelEncoder(NUM_CLASSES, 8, returned_layers, None, width=TINY)


def test_paper_widths_and_no_normalisation() -> None:
    """width=1.0 gives the paper's channels (stem 128; widths 64..512; outs 256..2048), no norm layers, stem bias."""
    body = LabelEncoder(80, 256, [1, 2, 3, 4], LastLevelMaxPool()).body
    assert body.stem.weight.shape == (128, 80, 7, 7)
    assert body.stem.stride == (2, 2) and body.stem.padding == (3, 3)
    assert body.stem.bias is not None and body.stem.bias.shape == (128,)
    in_channels = 128
    for k, (blocks, mid, out) in enumerate([(1, 64, 256), (2, 128, 512), (2, 256, 1024), (1, 512, 2048)], start=1):
        stage = getattr(body, f"layer{k}")
        assert len(stage) == blocks
        for i, block in enumerate(stage):
            assert block.conv1.weight.shape == (mid, in_channels, 1, 1)
            assert block.conv2.weight.shape == (mid, mid, 3, 3)
            assert block.conv2.stride == ((2, 2) if i == 0 else (1, 1))
            assert block.conv3.weight.shape == (out, mid, 1, 1)
            assert all(conv.bias is not None for conv in (block.conv1, block.conv2, block.conv3))
            if i == 0:
                assert block.shortcut.weight.shape == (out, in_channels, 1, 1)
                assert block.shortcut.stride == (2, 2) and block.shortcut.bias is None
            else:
                assert isinstance(block.shortcut, nn.Identity)
            in_channels = out
    norms = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)
    assert not any(isinstance(m, norms) for m in body.modules())


def test_paper_width_fpn_loads_strictly_into_resnet50_fpn() -> None:
    """At width=1.0, C2..C5 have ResNet-50's channels, so h's whole FPN loads strictly into the detector's (Step 2)."""
    encoder = LabelEncoder(80, 256, [2, 3, 4], LastLevelP6P7(256, 256))
    backbone = resnet_fpn_backbone(
        backbone_name="resnet50", weights=None, returned_layers=[2, 3, 4], extra_blocks=LastLevelP6P7(256, 256)
    )
    backbone.fpn.load_state_dict(encoder.fpn.state_dict(), strict=True)


def test_width_multiplier_scales_channels() -> None:
    body = LabelEncoder(NUM_CLASSES, 8, [1, 2, 3, 4], None, width=0.5).body
    assert body.stem.out_channels == 64
    assert [getattr(body, f"layer{k}")[0].conv3.out_channels for k in range(1, 5)] == [128, 256, 512, 1024]
    assert body.layer1[0].conv1.out_channels == 32
    assert LabelEncoder(NUM_CLASSES, 8, [1], None, width=0.01).body.layer1[0].conv1.out_channels == 8


@pytest.fixture
def encoder_and_dense() -> tuple[LabelEncoder, torch.Tensor]:
    torch.manual_seed(0)
    encoder = LabelEncoder(NUM_CLASSES, 16, [2, 3, 4], LastLevelP6P7(16, 16), width=TINY).eval()
    dense = torch.rand(2, NUM_CLASSES, 40, 56)
    dense[:, [1, 4]] = 0
    return encoder, dense


@pytest.mark.parametrize("classes", [[0, 2, 3, 5], [5, 0, 3, 2], [0, 1, 2, 3, 5]], ids=["sorted", "perm", "superset"])
def test_compact_input_equals_dense(encoder_and_dense, classes) -> None:
    """A compact map of the present classes (any order, extra zero channels allowed) encodes like the dense one."""
    encoder, dense = encoder_and_dense
    classes = torch.tensor(classes)
    with torch.no_grad():
        expected = encoder(dense)
        got = encoder(dense[:, classes], classes)
    assert list(got) == list(expected)
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], atol=1e-5, rtol=1e-4)


def test_compact_input_without_objects_equals_zero_map(encoder_and_dense) -> None:
    encoder, dense = encoder_and_dense
    classes = torch.empty(0, dtype=torch.int64)
    with torch.no_grad():
        expected = encoder(torch.zeros_like(dense))
        got = encoder(dense[:, classes], classes)
    for k in expected:
        assert got[k].shape == expected[k].shape
        torch.testing.assert_close(got[k], expected[k], atol=1e-5, rtol=1e-4)


def test_wrong_channel_count_raises(encoder_and_dense) -> None:
    encoder, dense = encoder_and_dense
    with pytest.raises(ValueError, match=f"{NUM_CLASSES + 1} channels, expected {NUM_CLASSES}"):
        encoder(torch.rand(1, NUM_CLASSES + 1, 32, 32))
    with pytest.raises(ValueError, match="3 channels, expected 2"):
        encoder(dense[:, :3], torch.tensor([0, 2]))


@pytest.mark.parametrize("returned_layers, extra", [RETINANET_FCOS, RCNN], ids=["p6p7", "maxpool"])
def test_gradient_reaches_every_parameter(returned_layers, extra) -> None:
    torch.manual_seed(0)
    encoder = LabelEncoder(NUM_CLASSES, 16, returned_layers, extra(16), width=TINY)
    sum(f.sum() for f in encoder(torch.rand(2, NUM_CLASSES, 64, 64)).values()).backward()
    for name, p in encoder.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


# ------------------------------------------------------------------------------------------- initialisation


def _bottleneck_convs(encoder: LabelEncoder) -> list[nn.Conv2d]:
    return [conv for name, conv in encoder.body.named_modules()
            if isinstance(conv, nn.Conv2d) and name.startswith("layer")]


def test_authors_init_is_kaiming_uniform_a1_on_bottleneck_convs() -> None:
    """h_init=authors: every bottleneck conv (shortcut included) within kaiming_uniform(a=1)'s bound sqrt(3/fan_in)
    and spread up to it; the stem and every bias keep PyTorch's default, uniform within 1/sqrt(fan_in)."""
    torch.manual_seed(0)
    encoder = LabelEncoder(NUM_CLASSES, 16, [1, 2, 3, 4], LastLevelMaxPool(), width=0.25, init="authors")
    convs = _bottleneck_convs(encoder)
    assert len(convs) == 6 * 3 + 4  # conv1..3 of 6 blocks, 4 shortcuts
    for conv in convs:
        fan_in = conv.weight[0].numel()
        bound = math.sqrt(3 / fan_in)
        assert conv.weight.abs().max() <= bound
        assert conv.weight.abs().max() > 0.9 * bound  # not kaiming_normal's (unbounded) nor default's (1/sqrt)
    for conv in [encoder.body.stem, *convs]:
        bound = 1 / math.sqrt(conv.weight[0].numel())
        if conv is encoder.body.stem:
            assert conv.weight.abs().max() <= bound
        if conv.bias is not None:
            assert 0 < conv.bias.abs().max() <= bound


def test_default_init_is_kaiming_normal_with_zero_biases() -> None:
    """The default (kaiming_normal) is what h always had: same tensors as asking for it, every body bias zero."""
    torch.manual_seed(0)
    default = LabelEncoder(NUM_CLASSES, 16, [2, 3, 4], LastLevelP6P7(16, 16), width=TINY).state_dict()
    torch.manual_seed(0)
    named = LabelEncoder(NUM_CLASSES, 16, [2, 3, 4], LastLevelP6P7(16, 16), width=TINY,
                         init="kaiming_normal").state_dict()
    assert all(torch.equal(default[k], named[k]) for k in default)
    assert all(not v.any() for k, v in default.items() if k.startswith("body.") and k.endswith(".bias"))
    with pytest.raises(ValueError, match="unknown initialisation 'xavier' of h; allowed: kaiming_normal, authors"):
        LabelEncoder(NUM_CLASSES, 16, [2, 3, 4], None, width=TINY, init="xavier")


def test_h_init_reaches_h_through_the_artifact_metadata() -> None:
    """build_label_encoder initialises h as the metadata says; metadata without h_init (older artifacts) is the
    default."""
    meta = encoder_metadata("fcos", ["a", "b", "c"], 32, TINY, "resnet18", h_init="authors")
    assert meta["h_init"] == "authors"
    torch.manual_seed(0)
    built = build_label_encoder(meta).state_dict()
    torch.manual_seed(0)
    direct = LabelEncoder(3, 32, [2, 3, 4], LastLevelP6P7(32, 32), width=TINY, init="authors").state_dict()
    assert all(torch.equal(built[k], direct[k]) for k in direct)
    old = {k: v for k, v in encoder_metadata("fcos", ["a", "b", "c"], 32, TINY, "resnet18").items() if k != "h_init"}
    torch.manual_seed(0)
    built = build_label_encoder(old).state_dict()
    torch.manual_seed(0)
    direct = LabelEncoder(3, 32, [2, 3, 4], LastLevelP6P7(32, 32), width=TINY).state_dict()
    assert all(torch.equal(built[k], direct[k]) for k in direct)


# ------------------------------------------------------------------------------------------------ P6 from C5


def test_h_with_p6_from_c5_takes_its_own_c5() -> None:
    """p6_from=c5 in the metadata: h's P6 conv reads h's C5 (round(2048 * width) channels), not the detector's."""
    meta = encoder_metadata("retinanet", ["a", "b", "c"], 16, TINY, "resnet18", p6_from="c5")
    encoder = build_label_encoder(meta).eval()
    c5 = level_channels([2, 3, 4], TINY)[-1]
    assert c5 == 128 == encoder.body.out_channels_list[-1]
    assert encoder.fpn.extra_blocks.p6.in_channels == c5 and not encoder.fpn.extra_blocks.use_P5
    with torch.no_grad():
        features = encoder(torch.rand(1, 3, 64, 64))
    assert features["p6"].shape == (1, 16, 1, 1) and features["p7"].shape == (1, 16, 1, 1)


def test_step2_init_with_p6_from_c5_skips_only_p6(tiny_config) -> None:
    """h's P6 (from its C5) and the detector's (from a resnet18 C5 of 512) differ in shape: Step 2 copies P7 and the
    output convs from h and leaves P6 alone."""
    torch.manual_seed(0)
    cfg = tiny_config(model={"p6_from": "c5"})
    meta = encoder_metadata("retinanet", ["a", "b", "c"], cfg.model.fpn_channels, TINY, "resnet18", p6_from="c5")
    encoder = build_label_encoder(meta)
    detector = build_detector(cfg.model, 3)
    artifact = {"encoder": encoder.state_dict(), "heads": {"head": detector.head.state_dict()}, "meta": meta}
    result = init_detector_from_artifact(detector, artifact)
    assert {"extra_blocks.p6.weight", "extra_blocks.p6.bias"} <= set(result["skipped"])
    assert {"extra_blocks.p7.weight", "extra_blocks.p7.bias"} <= set(result["copied"])


@pytest.mark.parametrize("step1, step2", [("p5", "c5"), ("c5", "p5"), (None, "c5")], ids=["p5-c5", "c5-p5", "old-c5"])
def test_a_label_encoder_of_another_p6_source_is_refused(step1: str | None, step2: str) -> None:
    """check_compatible names p6_from when h's P6 source is not the run's; an artifact without the key is p5."""
    have = encoder_metadata("retinanet", ["a", "b"], 16, TINY, "resnet18", p6_from=step1 or "p5")
    if step1 is None:
        del have["p6_from"]
    want = encoder_metadata("retinanet", ["a", "b"], 16, TINY, "resnet18", p6_from=step2)
    with pytest.raises(IncompatibleLabelEncoder, match=f"p6_from: label encoder has '{step1 or 'p5'}', this run has "
                                                      f"'{step2}'"):
        check_compatible(have, want, "h.pth")
    if step1 is None:
        check_compatible(have, encoder_metadata("retinanet", ["a", "b"], 16, TINY, "resnet18"), "h.pth")
