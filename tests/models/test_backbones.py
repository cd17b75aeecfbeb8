"""Pretrained backbone weights named as torchvision names them: read from the torch cache, downloaded into it by
torchvision when missing, or one quick WeightsError that says which file to fetch and where to put it."""

from __future__ import annotations

import socket
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from torchvision.models import ResNet18_Weights, resnet18

from labelenc.models import WeightsError, build_detector
from labelenc.models import backbones
from labelenc.models.backbones import OFFLINE_ENV, resolve_backbone_weights, torch_cache_file

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
