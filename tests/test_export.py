"""``labelenc export``: TorchScript and ONNX files of the plain detector that match the PyTorch model, and one-line
refusals that write nothing."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import onnxruntime
import pytest
import torch

from labelenc import export, runner
from labelenc.cli import main
from labelenc.config import Config, save_config
from labelenc.data.loader import build_datasets
from labelenc.engine.checkpoint import latest_checkpoint, save_file
from labelenc.export import ExportError, export_detector
from labelenc.models import build_detector

SUFFIX = {"torchscript": ".pt", "onnx": ".onnx"}
FAMILY_MODEL = {"fcos": {"fpn_channels": 64}}  # GroupNorm(32) over 32 channels cannot run one 64-px image (1x1 P7)


def _config(tiny_config: Callable[..., Config], family: str, tmp_path: Path) -> Config:
    return tiny_config(family, model=FAMILY_MODEL.get(family, {}), output_dir=str(tmp_path / "run"))


def _saved_detector(cfg: Config, path: Path, family: str | None = None) -> Path:
    """A freshly built detector (spread classification logits, so that scores differ) saved as model_final.pth."""
    class_names = build_datasets(cfg, with_masks=False)[0].class_names
    torch.manual_seed(0)
    model_cfg = cfg.model if family is None else cfg.model.model_copy(update={"family": family})
    detector = build_detector(model_cfg, len(class_names))
    with torch.no_grad():
        for name, param in detector.named_parameters():
            if "cls_logits" in name or "cls_score" in name:
                param.normal_(0, 0.3)
    config = cfg.model_dump(mode="json")
    config["model"]["family"] = model_cfg.family
    save_file({"kind": "detector", "model": detector.state_dict(), "config": config, "class_names": class_names}, path)
    return path


def _written(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in (tmp_path / "out").iterdir()) if (tmp_path / "out").exists() else []


def _error_line(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("labelenc: error:")]
    assert "Traceback" not in err and len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
@pytest.mark.parametrize("family", ["retinanet", "fcos", "faster_rcnn"])
def test_export_matches_pytorch(tiny_config: Callable[..., Config], tmp_path: Path, family: str, fmt: str) -> None:
    cfg = _config(tiny_config, family, tmp_path)
    weights = _saved_detector(cfg, tmp_path / "model_final.pth")
    out = tmp_path / "out" / f"detector{SUFFIX[fmt]}"

    report = export_detector(cfg, weights, fmt, out, parity_images=2)

    assert report.passed and report.path == out and out.is_file()
    assert report.detections >= 20 and report.images == 2  # real detections were compared, not an empty list
    assert report.max_box_diff <= export.BOX_TOL and report.max_score_diff <= export.SCORE_TOL
    if fmt == "torchscript":  # the same kernels: identical results
        assert report.max_box_diff == 0 and report.max_score_diff == 0
    assert _written(tmp_path) == [out.name]  # no temporary or failed file left beside it
    assert "PASS" in report.lines()


def test_onnx_file_is_called_as_documented(tiny_config: Callable[..., Config], tmp_path: Path) -> None:
    """Input ``image`` [3, H, W] of any size, named outputs, class names in the metadata (README's snippet)."""
    cfg = _config(tiny_config, "retinanet", tmp_path)
    out = tmp_path / "out" / "detector.onnx"
    export_detector(cfg, _saved_detector(cfg, tmp_path / "w.pth"), "onnx", out, parity_images=1)

    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["image"]
    assert {o.name for o in session.get_outputs()} == {"boxes", "scores", "labels"}
    meta = session.get_modelmeta().custom_metadata_map
    assert json.loads(meta["class_names"]) == build_datasets(cfg, with_masks=False)[0].class_names
    assert meta["family"] == "retinanet"
    image = torch.rand(3, 50, 90)  # another size than the one traced: the graph resizes it
    boxes, scores, labels = session.run(["boxes", "scores", "labels"], {"image": image.numpy()})
    assert boxes.shape[1] == 4 and len(boxes) == len(scores) == len(labels) > 0
    assert boxes[:, 2].max() <= 90 + 1e-3 and boxes[:, 3].max() <= 50 + 1e-3  # input-image pixels


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning",
                            "ignore:RetinaNet always returns:UserWarning")
def test_step2_weights_and_checkpoint_export(tiny_config: Callable[..., Config], tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    """The final weights of a real Step-2 run, and its training checkpoint (``detector.`` prefix), export and pass."""
    step1 = runner.train(tiny_config(train={"base_iters": 2}, output_dir=str(tmp_path / "s1")), "step1")
    cfg = tiny_config(train={"base_iters": 2}, output_dir=str(tmp_path / "s2"))
    step2 = runner.train(cfg, "step2", {"label_encoder": str(step1.outputs["label_encoder"])})
    config = tmp_path / "s2" / "config.yaml"

    out = tmp_path / "out" / "step2.onnx"
    assert main(["export", str(config), "--weights", str(step2.weights), "--format", "onnx", "--out", str(out),
                 "--score-thresh", "0.005"]) == 0
    printed = capsys.readouterr().out
    assert f"exported: {out}" in printed and "max |Δbox|" in printed and printed.rstrip().endswith("PASS")
    assert "no detection scored" not in printed  # detections were compared

    checkpoint = latest_checkpoint(tmp_path / "s2")
    report = export_detector(cfg, checkpoint, "torchscript", tmp_path / "out" / "ckpt.pt", score_thresh=0.005,
                             parity_images=2)
    assert report.passed and report.detections > 0
    extra = {export.METADATA: ""}
    scripted = torch.jit.load(str(report.path), _extra_files=extra)
    assert json.loads(extra[export.METADATA])["score_thresh"] == 0.005
    image = build_datasets(cfg, with_masks=False)[1][0][0].as_subclass(torch.Tensor)
    _, detections = scripted([image])  # README's call
    assert set(detections[0]) == {"boxes", "scores", "labels"}


def test_weights_of_another_family_are_refused_and_nothing_written(
    tiny_config: Callable[..., Config], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = _config(tiny_config, "retinanet", tmp_path)
    weights = _saved_detector(cfg, tmp_path / "fcos.pth", family="faster_rcnn")
    config = tmp_path / "c.yaml"
    save_config(cfg, config)
    line = _error_line(["export", str(config), "--weights", str(weights), "--format", "torchscript", "--out",
                        str(tmp_path / "out" / "d.pt")], capsys)
    assert str(weights) in line and "family" in line and "faster_rcnn" in line
    assert _written(tmp_path) == []


def test_unsupported_family_and_format_is_one_error_before_anything(
    tiny_config: Callable[..., Config], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = _config(tiny_config, "retinanet", tmp_path)
    monkeypatch.setitem(export.UNSUPPORTED, ("retinanet", "onnx"), "its post-processing cannot be traced")
    with pytest.raises(ExportError, match="retinanet cannot be exported to onnx: its post-processing"):
        export_detector(cfg, tmp_path / "missing.pth", "onnx", tmp_path / "out" / "d.onnx")
    with pytest.raises(ExportError, match="unknown export format 'tflite'"):
        export_detector(cfg, tmp_path / "missing.pth", "tflite", tmp_path / "out" / "d.tflite")
    monkeypatch.undo()  # retinanet exports to onnx again: the backbone is what is refused below
    dcn = cfg.model_copy(update={"model": cfg.model.model_copy(update={"backbone": "resnet50_dcn"})})
    with pytest.raises(ExportError, match="resnet50_dcn cannot be exported to onnx: .*deform_conv2d"):
        export_detector(dcn, tmp_path / "missing.pth", "onnx", tmp_path / "out" / "d.onnx")
    assert _written(tmp_path) == []


def test_model_too_large_for_onnx_is_refused(tiny_config: Callable[..., Config], tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = _config(tiny_config, "retinanet", tmp_path)
    weights = _saved_detector(cfg, tmp_path / "w.pth")
    monkeypatch.setattr(export, "ONNX_MAX_BYTES", 1000)
    with pytest.raises(ExportError, match="retinanet with resnet18 cannot be exported to onnx: .* 2 GiB limit"):
        export_detector(cfg, weights, "onnx", tmp_path / "out" / "d.onnx")
    assert _written(tmp_path) == []


def test_missing_onnx_packages_are_one_line(
    tiny_config: Callable[..., Config], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = _config(tiny_config, "retinanet", tmp_path)
    config = tmp_path / "c.yaml"
    save_config(cfg, config)
    monkeypatch.setitem(__import__("sys").modules, "onnxruntime", None)  # import onnxruntime -> ImportError
    line = _error_line(["export", str(config), "--weights", str(tmp_path / "w.pth"), "--format", "onnx", "--out",
                        str(tmp_path / "out" / "d.onnx")], capsys)
    assert "onnxruntime" in line and "pip install 'labelenc[export]'" in line
    assert _written(tmp_path) == []


def test_failed_parity_renames_the_file_and_exits_2(
    tiny_config: Callable[..., Config], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str]
) -> None:
    """An exported model that disagrees is kept only as *.parity-failed.*; a previous good file stays as it was."""
    cfg = _config(tiny_config, "retinanet", tmp_path)
    weights = _saved_detector(cfg, tmp_path / "w.pth")
    config = tmp_path / "c.yaml"
    save_config(cfg, config)
    out = tmp_path / "out" / "d.pt"
    out.parent.mkdir()
    out.write_bytes(b"an earlier export")
    real_runner = export._runner

    def shifted(fmt: str, path: Path, outputs: list[str]):
        run = real_runner(fmt, path, outputs)
        return lambda image: {**run(image), "boxes": run(image)["boxes"] + 0.5}

    monkeypatch.setattr(export, "_runner", shifted)
    line = _error_line(["export", str(config), "--weights", str(weights), "--format", "torchscript", "--out",
                        str(out)], capsys)
    failed = tmp_path / "out" / "d.parity-failed.pt"
    assert "does not match PyTorch" in line and str(failed) in line
    assert out.read_bytes() == b"an earlier export" and failed.is_file()
    assert _written(tmp_path) == ["d.parity-failed.pt", "d.pt"]


def test_compare_detections_matches_by_value_and_allows_the_cut_off() -> None:
    """Tied scores may come in either order; a detection at the score threshold may be on one side only."""
    boxes = torch.tensor([[0.0, 0, 10, 10], [5, 5, 20, 20], [1, 1, 4, 4]])
    ref = {"boxes": boxes, "scores": torch.tensor([0.9, 0.9, 0.0505]), "labels": torch.tensor([1, 2, 1])}
    swapped = {"boxes": boxes[[1, 0]] + 1e-4, "scores": torch.tensor([0.9, 0.9]) + 1e-5,
               "labels": torch.tensor([2, 1])}
    result = export._Comparison()
    export.compare_detections(ref, swapped, 0.05, 100, 0, result)
    assert result.matched == 2 and result.borderline == 1 and not result.unmatched
    assert result.box == pytest.approx(1e-4, rel=0.05)

    other_label = {**swapped, "labels": torch.tensor([1, 1])}
    result = export._Comparison()
    export.compare_detections(ref, other_label, 0.05, 100, 3, result)
    assert result.matched == 1 and len(result.unmatched) == 2 and "image 3" in result.unmatched[0]


def test_export_help_has_examples(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["export", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "--format {torchscript,onnx}" in out and "labelenc export " in out.split("examples:")[1]
