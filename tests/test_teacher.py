"""Knowledge distillation (paper, Table 6): Step 2 towards a trained teacher's backbone + FPN features (--teacher)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from labelenc import cli, runner
from labelenc.artifact import IncompatibleLabelEncoder, build_label_encoder, encoder_metadata, save_label_encoder
from labelenc.config import Config, save_config
from labelenc.data.coco import CocoDetection
from labelenc.data.loader import collate
from labelenc.engine.checkpoint import latest_checkpoint, load_file, save_file
from labelenc.errors import UserError
from labelenc.method import Step2, TeacherTarget
from labelenc.models import build_detector
from labelenc.stages import STAGES

CLASSES = ["rectangle", "ellipse", "triangle"]


def write_detector_file(path: Path, cfg: Config, class_names: list[str] = CLASSES, checkpoint: bool = False,
                        stage: str = "baseline") -> nn.Module:
    """A detector of ``cfg`` saved as ``runner.train`` saves one: model_final.pth, or a checkpoint of its objective."""
    torch.manual_seed(1)
    detector = build_detector(cfg.model, len(class_names))
    for p in detector.parameters():  # unlike any freshly built student
        p.data.add_(0.01 * torch.randn_like(p))
    extra = {"config": cfg.model_dump(mode="json"), "stage": stage, "class_names": class_names,
             "category_ids": list(range(1, len(class_names) + 1))}
    if checkpoint:
        state = {f"detector.{k}": v for k, v in detector.state_dict().items()}
        save_file({"model": state, "iteration": 2, **extra}, path)
    else:
        save_file({"kind": "detector", "model": detector.state_dict(), **extra}, path)
    return detector.eval()


def synth_batch(synth_root: Path) -> tuple[list[Tensor], list[dict[str, Tensor]]]:
    dataset = CocoDetection(synth_root / "annotations/instances_train.json", synth_root / "train")
    return collate([dataset[i] for i in (0, 3)])


def kd_objective(cfg: Config, teacher_file: Path) -> tuple[nn.Module, Step2]:
    detector = build_detector(cfg.model, len(CLASSES))
    objective = STAGES["step2"].build(cfg, detector, CLASSES, {"teacher": str(teacher_file)})
    assert isinstance(objective.model, Step2) and isinstance(objective.model.target, TeacherTarget)
    return detector, objective.model


@pytest.mark.parametrize("checkpoint", [False, True], ids=["model_final", "checkpoint"])
def test_kd_target_is_the_teachers_backbone_on_the_students_batch(
    tiny_config: Callable[..., Config], synth_root: Path, tmp_path: Path, checkpoint: bool
) -> None:
    """The target of the student's transformed batch is teacher.backbone(images): a ResNet-34 teacher (from its
    model_final.pth or checkpoint) for a ResNet-18 student, with the student's head left as it was."""
    cfg = tiny_config()
    teacher = write_detector_file(tmp_path / "teacher.pth", tiny_config(model={"backbone": "resnet34"}),
                                  checkpoint=checkpoint)
    torch.manual_seed(0)
    fresh = build_detector(cfg.model, len(CLASSES)).state_dict()
    torch.manual_seed(0)
    detector, model = kd_objective(cfg, tmp_path / "teacher.pth")
    assert all(torch.equal(v, fresh[k]) for k, v in detector.state_dict().items())  # no init from the teacher
    seen: list[tuple[Tensor, dict[str, Tensor]]] = []
    model.target.register_forward_hook(lambda module, args, out: seen.append((args[0].tensors, out)))
    images, targets = synth_batch(synth_root)

    with torch.no_grad():
        losses = model.train()(images, targets)
        image_list, _ = detector.transform(images, [{k: v.clone() for k, v in t.items()} for t in targets])
        expected = teacher.backbone(image_list.tensors)

    assert "feature_distance" in losses
    (inputs, features), = seen
    assert torch.equal(inputs, image_list.tensors)
    assert list(features) == list(expected) == ["0", "1", "2", "p6", "p7"]
    assert all(torch.equal(features[k], expected[k]) for k in expected)


def test_teacher_is_unchanged_by_training(tiny_config: Callable[..., Config], synth_root: Path, tmp_path: Path) -> None:
    """Frozen and in eval mode: bit-identical parameters and BatchNorm statistics after SGD steps with momentum and
    weight decay on every parameter of the objective, the teacher's included."""
    cfg = tiny_config()
    write_detector_file(tmp_path / "teacher.pth", cfg)
    detector, model = kd_objective(cfg, tmp_path / "teacher.pth")
    before = {k: v.clone() for k, v in model.target.state_dict().items()}
    student_before = [p.detach().clone() for p in detector.backbone.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=0.1)
    images, targets = synth_batch(synth_root)
    for _ in range(3):
        model.train()
        assert not any(m.training for m in model.target.modules())
        losses = model(images, targets)
        optimizer.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        assert all(p.grad is None and not p.requires_grad for p in model.target.parameters())
        optimizer.step()
    assert all(torch.equal(v, before[k]) for k, v in model.target.state_dict().items())
    assert any(not torch.equal(a, p) for a, p in zip(student_before, detector.backbone.parameters()))


# ------------------------------------------------------------------------------------------------ bad input


def label_encoder_file(path: Path, cfg: Config) -> None:
    detector = build_detector(cfg.model, len(CLASSES))
    meta = encoder_metadata(cfg.model.family, CLASSES, cfg.model.fpn_channels, cfg.labelenc.encoder_width,
                            cfg.model.backbone)
    save_label_encoder(path, build_label_encoder(meta), detector, meta, cfg.model_dump(mode="json"))


BAD_INPUTS = {
    # case: (input name, writes the file given the student's config factory, words the error must hold)
    "other-classes": ("teacher", lambda path, make: write_detector_file(path, make(), ["a", "b", "c"]),
                      "classes: teacher ['a', 'b', 'c'], data ['rectangle', 'ellipse', 'triangle']"),
    "other-family": ("teacher", lambda path, make: write_detector_file(path, make("faster_rcnn")),
                     "family: teacher 'faster_rcnn', config 'retinanet'"),
    "other-fpn-width": ("teacher", lambda path, make: write_detector_file(path, make(model={"fpn_channels": 32})),
                        "fpn_channels: teacher 32, config 16"),
    "label-encoder-as-teacher": ("teacher", lambda path, make: label_encoder_file(path, make()),
                                 "is a label-encoder file (h and the head, written by step1), not detector weights"),
    "detector-as-label-encoder": ("label_encoder", lambda path, make: write_detector_file(path, make()),
                                  "is not a label-encoder file (it holds a detector)"),
    "plain-state-dict": ("teacher", lambda path, make: torch.save(build_detector(make().model, 3).state_dict(), path),
                         "is not a labelenc teacher (no format_version)"),
    "text-file": ("teacher", lambda path, make: path.write_text("not weights"), "is not a torch file"),
    "reconstruction-only-checkpoint": ("teacher", lambda path, make: write_detector_file(
        path, make(), checkpoint=True, stage="step1_recon"), "holds no detector weights"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_file_is_one_clear_error_before_the_run_directory_is_written(
    tiny_config: Callable[..., Config], tmp_path: Path, case: str
) -> None:
    name, write, words = BAD_INPUTS[case]
    path = tmp_path / "given.pth"
    write(path, tiny_config)
    cfg = tiny_config(output_dir=str(tmp_path / "step2"))

    with pytest.raises(UserError) as info:
        runner.train(cfg, "step2", {name: str(path)})

    assert str(path) in str(info.value) and words in str(info.value)
    assert not (tmp_path / "step2").exists()


def test_label_encoder_of_another_pyramid_is_refused_before_the_run_directory_is_written(
    tiny_config: Callable[..., Config], tmp_path: Path
) -> None:
    cfg = tiny_config(output_dir=str(tmp_path / "step2"))
    label_encoder_file(tmp_path / "h.pth", tiny_config(model={"fpn_channels": 32}))
    with pytest.raises(IncompatibleLabelEncoder, match="fpn_channels"):
        runner.train(cfg, "step2_supervision_only", {"label_encoder": str(tmp_path / "h.pth")})
    assert not (tmp_path / "step2").exists()


# ------------------------------------------------------------------------------------------------ command line


def test_cli_step2_with_a_teacher_run(tiny_config: Callable[..., Config], tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    """``labelenc train`` makes a teacher, ``labelenc step2 CONFIG --teacher model_final.pth`` distils from it; the
    teacher in the run's last checkpoint is the file's, bit for bit."""
    config = tmp_path / "config.yaml"
    save_config(tiny_config(model={"fpn_channels": 32}, train={"base_iters": 2}), config)
    teacher = tmp_path / "teacher" / runner.FINAL_WEIGHTS
    assert cli.main(["train", str(config), f"output_dir={tmp_path / 'teacher'}", "train.base_iters=1"]) == 0
    capsys.readouterr()

    code = cli.main(["step2", str(config), "--teacher", str(teacher), f"output_dir={tmp_path / 'kd'}"])

    out = capsys.readouterr().out
    assert code == 0 and f"weights: {tmp_path / 'kd' / runner.FINAL_WEIGHTS}" in out and "bbox: AP" in out
    records = (tmp_path / "kd" / "metrics.jsonl").read_text().splitlines()
    assert len(records) == 2 and "feature_distance" in records[0]
    state, trained = load_file(latest_checkpoint(tmp_path / "kd"))["model"], load_file(teacher)["model"]
    backbone = {k: v for k, v in trained.items() if k.startswith("backbone.")}
    assert backbone and all(torch.equal(state[f"target.{k}"], v) for k, v in backbone.items())
    assert not any(k.startswith("target.") for k in load_file(tmp_path / "kd" / runner.FINAL_WEIGHTS)["model"])
