"""Backbones: pretrained weights named as torchvision names them (read from the torch cache, downloaded into it by
torchvision when missing, or one quick WeightsError that says which file to fetch and where to put it), and the
backbones built beyond torchvision's own: ResNet with modulated deformable convolutions (DCNv2) and MobileNetV2."""

from __future__ import annotations

import re
import socket
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from torch import nn
from torchvision.models import ResNet18_Weights, ResNet50_Weights, get_model, resnet18, resnet50
from torchvision.ops.misc import FrozenBatchNorm2d

from labelenc.data.coco import CocoDetection
from labelenc.data.loader import collate
from labelenc.models import FAMILIES, WeightsError, build_detector
from labelenc.models import backbones
from labelenc.models.backbones import BACKBONES, OFFLINE_ENV, build_backbone, resolve_backbone_weights, torch_cache_file
from labelenc.models.dcn import ModulatedDeformConv2d

NUM_CLASSES = 3
URL = ResNet18_Weights.IMAGENET1K_V1.url
FILE_NAME = "resnet18-f37072fd.pth"  # torchvision's name for it, as torch.hub stores it
QUICK = 20.0  # s: a refused or impossible download must say so well within this


@pytest.fixture
def torch_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty torch cache (TORCH_HOME), no offline switch."""
    home = tmp_path / "torch_home"
    home.mkdir()
    monkeypatch.setenv("TORCH_HOME", str(home))
    monkeypatch.delenv(OFFLINE_ENV, raising=False)
    return home


def _files(home: Path) -> list[Path]:
    return [p for p in home.rglob("*") if p.is_file()]


def test_the_cache_file_is_torchvisions(torch_home: Path) -> None:
    assert torch_cache_file(URL) == torch_home / "hub" / "checkpoints" / FILE_NAME


@pytest.mark.parametrize("refusal", [None, "config", "env"], ids=["download-allowed", "model.download=false",
                                                                 "LABELENC_OFFLINE=1"])
def test_a_name_missing_from_the_cache_is_one_quick_error_naming_url_and_path(
    refusal: str | None, torch_home: Path, tiny_config, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Allowed, the download is tried and fails (no network here or in CI); refused, it is not tried. Either way:
    one WeightsError within seconds that names the URL to fetch and the cache file to put it in; nothing is left."""
    if refusal is None and backbones._unreachable(URL, 5.0) is None:
        pytest.skip("this machine reaches download.pytorch.org: the download would succeed")
    if refusal == "env":
        monkeypatch.setenv(OFFLINE_ENV, "1")
    cfg = tiny_config(model={"backbone_weights": "IMAGENET1K_V1", "download": refusal != "config"}).model
    start = time.perf_counter()
    with pytest.raises(WeightsError) as caught:
        build_detector(cfg, NUM_CLASSES)
    assert time.perf_counter() - start < QUICK
    message = str(caught.value)
    assert f"Fetch {URL} " in message and f"put it at {torch_home / 'hub/checkpoints' / FILE_NAME} " in message
    expected = {None: "cannot be downloaded (", "config": "downloading is off (model.download is false)",
                "env": "downloading is off (LABELENC_OFFLINE=1)"}[refusal]
    assert expected in message
    assert _files(torch_home) == []


def test_a_stalled_download_gives_up_after_the_timeout(torch_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A server (here a proxy) that accepts the connection and never answers: the download gives up after
    DOWNLOAD_TIMEOUT, with the socket default timeout restored, instead of hanging."""
    silent = socket.create_server(("127.0.0.1", 0))  # the kernel accepts connections; nobody ever answers
    monkeypatch.setenv("https_proxy", f"http://127.0.0.1:{silent.getsockname()[1]}")
    monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{silent.getsockname()[1]}")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.setattr(urllib.request, "_opener", None)  # urlopen builds its opener (and reads proxies) anew
    monkeypatch.setattr(backbones, "DOWNLOAD_TIMEOUT", 1.0)
    try:
        start = time.perf_counter()
        with pytest.raises(WeightsError, match=r"cannot be downloaded \(.*timed out"):
            resolve_backbone_weights("resnet18", "IMAGENET1K_V1")
        assert time.perf_counter() - start < QUICK
    finally:
        silent.close()
    assert socket.getdefaulttimeout() is None
    assert _files(torch_home) == []  # torch.hub's partial file is removed


def test_a_hanging_name_lookup_does_not_hang(torch_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No socket timeout bounds a DNS lookup: the connection check gives up after DOWNLOAD_TIMEOUT all the same."""
    release = threading.Event()

    def hang(address: tuple, timeout: float | None = None) -> socket.socket:
        release.wait(60)
        raise OSError("released")

    monkeypatch.setattr(backbones.socket, "create_connection", hang)
    monkeypatch.setattr(backbones, "DOWNLOAD_TIMEOUT", 0.5)
    monkeypatch.delenv("https_proxy", raising=False)
    monkeypatch.delenv("HTTPS_PROXY", raising=False)
    start = time.perf_counter()
    try:
        with pytest.raises(WeightsError, match=r"no answer from download\.pytorch\.org:443 within 0\.5 s"):
            resolve_backbone_weights("resnet18", "IMAGENET1K_V1")
        assert time.perf_counter() - start < 5
    finally:
        release.set()


@pytest.mark.parametrize("name", ["IMAGENET1K_V1", "ResNet18_Weights.IMAGENET1K_V1", "DEFAULT"])
def test_a_name_in_the_cache_is_loaded_without_downloading(
    name: str, torch_home: Path, tiny_config, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The file at torchvision's cache path is what the backbone gets, tensor for tensor (download refused: no
    network is needed when the file is there)."""
    torch.manual_seed(0)
    state = resnet18(weights=None).state_dict()
    state["bn1.running_mean"] = torch.randn(64)  # not the fresh-init values the detector would have anyway
    path = torch_home / "hub" / "checkpoints" / FILE_NAME
    path.parent.mkdir(parents=True)
    torch.save(state, path)
    monkeypatch.setenv(OFFLINE_ENV, "1")
    body = build_detector(tiny_config(model={"backbone_weights": name, "download": False}).model,
                          NUM_CLASSES).backbone.body
    loaded = body.state_dict()
    body_keys = [k for k in state if not k.startswith("fc.") and not k.endswith("num_batches_tracked")]
    assert body_keys and all(k in loaded for k in body_keys)
    for key in body_keys:
        assert torch.equal(loaded[key], state[key]), key


# ------------------------------------------------------------------------------- new backbones in every family

TRAINED = [(name, family) for name in ("resnet50_dcn", "mobilenet_v2") for family in FAMILIES]
TRAINED.append(("resnet101_dcn", "retinanet"))  # heavy: one family; its layout is resnet50_dcn's (test below)


@pytest.mark.parametrize("name, family", TRAINED, ids=[f"{n}-{f}" for n, f in TRAINED])
def test_new_backbone_trains_two_steps_in_each_family(name: str, family: str, tiny_config, synth_root: Path) -> None:
    """Each new backbone builds in each family at tiny size and takes two finite SGD steps that move its weights
    (the DCN offset predictors included: they get a gradient although they start at zero)."""
    ds = CocoDetection(synth_root / "annotations/instances_train.json", synth_root / "train",
                       with_masks=FAMILIES[family].with_masks)
    images, targets = collate([ds[0], ds[1]])
    torch.manual_seed(0)
    model = build_detector(tiny_config(family, model={"backbone": name}).model, NUM_CLASSES).train()
    body = model.backbone.body
    before = {k: v.clone() for k, v in body.state_dict().items()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    for _ in range(2):
        losses = model(images, targets)
        total = sum(losses.values())
        assert torch.isfinite(total), losses
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
    offsets = [m.conv_offset for m in body.modules() if isinstance(m, ModulatedDeformConv2d)]
    assert len(offsets) == (13 if name == "resnet50_dcn" else 30 if name == "resnet101_dcn" else 0)
    assert all(conv.weight.grad.abs().sum() > 0 for conv in offsets)
    after = body.state_dict()
    assert any(not torch.equal(after[k], v) for k, v in before.items())


# ------------------------------------------------------------------------------------------------- DCNv2


@pytest.mark.parametrize("stride, dilation, bias", [(1, 1, False), (2, 1, False), (1, 2, True), (2, 1, True)],
                         ids=["s1", "s2", "d2-bias", "s2-bias"])
def test_fresh_dcn_equals_the_plain_convolution(stride: int, dilation: int, bias: bool) -> None:
    """Zero offsets and unit modulation (a fresh layer): the plain convolution with the same weights, to 1e-5."""
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 16, 3, stride=stride, padding=dilation, dilation=dilation, bias=bias)
    dcn = ModulatedDeformConv2d.from_conv(conv)
    assert dcn.weight is conv.weight and dcn.bias is conv.bias  # taken over, so the keys and weights are conv's
    assert set(dcn.state_dict()) == {*conv.state_dict(), "conv_offset.weight", "conv_offset.bias"}
    assert dcn.conv_offset.weight.shape == (27, 8, 3, 3) and dcn.conv_offset.stride == (stride, stride)
    x = torch.randn(2, 8, 19, 23)
    with torch.no_grad():
        expected, got = conv(x), dcn(x)
    assert got.shape == expected.shape
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_dcn_uses_its_predicted_offsets_and_modulation() -> None:
    """Modulation 2·sigmoid(m): m = log(1/3) halves the output; a whole-pixel offset samples the shifted input
    (offsets are in torchvision's order, (dy, dx) per tap, then the modulation logits)."""
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 4, 3, padding=1, bias=False)
    dcn = ModulatedDeformConv2d.from_conv(conv)
    x = torch.randn(1, 4, 12, 12)
    with torch.no_grad():
        plain = conv(x)
        dcn.conv_offset.bias[18:] = torch.log(torch.tensor(1 / 3))  # sigmoid = 1/4, times 2 = 1/2
        assert torch.allclose(dcn(x), plain / 2, atol=1e-5)
        dcn.conv_offset.bias.zero_()
        dcn.conv_offset.bias[1:18:2] = 1.0  # every tap one pixel to the right (offsets are (dy, dx) pairs)
        shifted = conv(torch.cat([x[..., 1:], torch.zeros_like(x[..., :1])], dim=-1))
        assert torch.allclose(dcn(x)[..., 1:], shifted[..., 1:], atol=1e-5)  # column 0 reads x, not padding


def test_dcn_runs_under_bf16_autocast() -> None:
    """Under AMP (train.amp=bf16, here on the CPU) a DCN takes bfloat16 or float32 inputs and gives x's dtype and
    a gradient to its offset predictor."""
    torch.manual_seed(0)
    dcn = ModulatedDeformConv2d(8, 8, 3, stride=2, padding=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert dcn(torch.randn(1, 8, 16, 16)).dtype == torch.float32
        out = dcn(torch.randn(1, 8, 16, 16).bfloat16())
    assert out.dtype == torch.bfloat16
    out.float().square().sum().backward()
    assert dcn.conv_offset.weight.grad.abs().sum() > 0


def test_fresh_resnet50_dcn_body_equals_plain_resnet50_body() -> None:
    """resnet50_dcn with resnet50's conv and BN weights gives resnet50's pyramid (eval mode; the levels reach ~100
    here, and differ by ~1e-4: float rounding of im2col against the direct convolution)."""
    torch.manual_seed(0)
    dcn = build_backbone("resnet50_dcn", None, None, [1, 2, 3, 4], 16, FAMILIES["faster_rcnn"].extra_blocks).eval()
    plain = build_backbone("resnet50", None, None, [1, 2, 3, 4], 16, FAMILIES["faster_rcnn"].extra_blocks).eval()
    state = {k: v for k, v in dcn.state_dict().items() if ".conv_offset." not in k}
    plain.load_state_dict(state, strict=True)
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        expected, got = plain(x), dcn(x)
    for key in expected:
        assert torch.allclose(got[key], expected[key], rtol=1e-4, atol=1e-3), key


def _template(key: str) -> str:
    """A state-dict key with its block index blanked: 'layer3.17.conv2.weight' -> 'layer3.*.conv2.weight'."""
    return re.sub(r"^(layer\d)\.\d+\.", r"\1.*.", key)


def test_resnet101_dcn_is_resnet50_dcn_with_more_blocks() -> None:
    """Same key layout block for block (DCN in every conv2 of layer2..4, none in layer1), 23 blocks in layer3."""
    nets = {}
    for name in ("resnet50_dcn", "resnet101_dcn"):
        spec = BACKBONES[name]
        nets[name] = get_model(spec.net, weights=None)
        spec.convert(nets[name])
    r50, r101 = nets["resnet50_dcn"], nets["resnet101_dcn"]
    assert [len(r50.layer1), len(r50.layer2), len(r50.layer3), len(r50.layer4)] == [3, 4, 6, 3]
    assert [len(r101.layer1), len(r101.layer2), len(r101.layer3), len(r101.layer4)] == [3, 4, 23, 3]
    assert {_template(k) for k in r50.state_dict()} == {_template(k) for k in r101.state_dict()}
    for net in (r50, r101):
        assert not any(isinstance(m, ModulatedDeformConv2d) for m in net.layer1.modules())
        assert all(isinstance(block.conv2, ModulatedDeformConv2d) for layer in (net.layer2, net.layer3, net.layer4)
                   for block in layer)


def test_imagenet_resnet50_weights_load_into_resnet50_dcn(tiny_config, tmp_path: Path) -> None:
    """A torchvision resnet50 state dict (ImageNet layout) given as a file loads into resnet50_dcn: only the offset
    predictors are missing, and they keep their zero start; a state dict without one real conv weight is refused."""
    torch.manual_seed(0)
    state = {k: v for k, v in resnet50().state_dict().items() if not k.startswith("fc.")}
    state["layer3.2.conv2.weight"] = torch.randn_like(state["layer3.2.conv2.weight"]) + 1.0
    path = tmp_path / "resnet50.pth"
    torch.save(state, path)
    cfg = tiny_config(model={"backbone": "resnet50_dcn", "backbone_weights": str(path)}).model
    body = build_detector(cfg, NUM_CLASSES).backbone.body
    loaded = body.state_dict()
    for key in (k for k in state if not k.endswith("num_batches_tracked")):
        assert torch.equal(loaded[key], state[key]), key
    assert isinstance(body.layer3[2].conv2, ModulatedDeformConv2d) and isinstance(body.bn1, FrozenBatchNorm2d)
    offsets = [k for k in loaded if k not in state]
    assert offsets and all(".conv2.conv_offset." in k for k in offsets)
    assert all(not loaded[k].any() for k in offsets)

    del state["layer2.1.conv2.weight"]
    torch.save(state, path)
    with pytest.raises(WeightsError, match=r"do not fit resnet50_dcn: missing \['layer2\.1\.conv2\.weight'\]"):
        build_detector(cfg, NUM_CLASSES)


def test_dcn_backbones_take_the_plain_resnets_weights_names(torch_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Weights names of resnet50_dcn are resnet50's (the registry names the torchvision net it is built from)."""
    monkeypatch.setenv(OFFLINE_ENV, "1")
    with pytest.raises(WeightsError, match="IMAGENET1K_V1, IMAGENET1K_V2"):
        resolve_backbone_weights("resnet50_dcn", "IMAGENET_BEST")
    with pytest.raises(WeightsError, match=re.escape(ResNet50_Weights.IMAGENET1K_V2.url)):
        resolve_backbone_weights("resnet50_dcn", "IMAGENET1K_V2")


# ----------------------------------------------------------------------------------- MobileNetV2, frozen stages


def test_mobilenet_v2_levels_are_the_last_block_of_each_stride() -> None:
    """C2..C5 are features 3, 6, 13, 17 (24, 32, 96, 320 channels) at strides 4..32; the 1280-channel conv is
    not built into the body."""
    body = build_backbone("mobilenet_v2", None, None, [1, 2, 3, 4], 16, FAMILIES["faster_rcnn"].extra_blocks)
    assert [block[0].in_channels for block in body.fpn.inner_blocks] == [24, 32, 96, 320]
    assert list(body.body.return_layers) == ["3", "6", "13", "17"] and not hasattr(body.body, "18")
    with torch.no_grad():
        levels = body.body(torch.rand(1, 3, 64, 64))
    assert [tuple(v.shape[1:]) for v in levels.values()] == [(24, 16, 16), (32, 8, 8), (96, 4, 4), (320, 2, 2)]


@pytest.mark.parametrize("name, frozen, trainable", [
    ("mobilenet_v2", ["0.", "1.", "2.", "3."], ["4.", "13.", "17."]),
    ("resnet50_dcn", ["conv1.", "layer1."], ["layer2.0.conv2.conv_offset.", "layer4."]),
], ids=["mobilenet_v2", "resnet50_dcn"])
def test_trainable_layers_freeze_the_first_stages(name: str, frozen: list[str], trainable: list[str]) -> None:
    """trainable_layers=3 trains the stride-8..32 stages (C3..C5) and freezes the ones below, DCN offsets alike."""
    body = build_backbone(name, None, 3, [2, 3, 4], 16, FAMILIES["retinanet"].extra_blocks).body
    grads = {k: p.requires_grad for k, p in body.named_parameters()}
    for prefix in frozen:
        assert any(k.startswith(prefix) for k in grads) and not any(g for k, g in grads.items() if k.startswith(prefix))
    for prefix in trainable:
        assert any(k.startswith(prefix) for k in grads) and all(g for k, g in grads.items() if k.startswith(prefix))
