"""labelenc.stages: the registry the runner, the CLI and the pipeline are built from, and what each recipe sets up."""

from __future__ import annotations

from collections.abc import Mapping

import pytest
from torch import nn

from labelenc import cli, runner
from labelenc.config import Config
from labelenc.errors import UserError
from labelenc.method import Baseline, LabelEncoderTarget, Step1, Step2
from labelenc.models import build_detector
from labelenc.stages import LABEL_ENCODER, STAGES, Objective, Stage, register_stage

CLASSES = ["a", "b", "c"]


def test_registry_holds_the_stages_and_only_the_paper_runs_have_pipeline_rows() -> None:
    """The ablation stages get CLI commands but no pipeline row, so ``labelenc pipeline`` runs the paper's Table 1."""
    assert list(STAGES) == ["baseline", "step1", "step2", "step1_recon", "step2_supervision_only", "step2_init_only"]
    assert [(row, stage.name) for stage in STAGES.values() for row, *_ in stage.pipeline_rows] == [
        ("baseline 1x", "baseline"), ("baseline 2x", "baseline"), ("step1-only", "step1"), ("LabelEnc", "step2")]
    for command, inputs in (("step1-recon", []), ("step2-supervision-only", ["--label-encoder", "h.pth"]),
                            ("step2-init-only", ["--label-encoder", "h.pth"])):
        assert cli.parse_args([command, "cfg.yaml", *inputs]).command == command


def test_recipes_set_lengths_offsets_and_loss_weight_schedules(tiny_config, tmp_path) -> None:
    """Baseline: 1x, no schedule. Step 1: warm-up (1/3 of 1x) without L3, LR decays moved back. Step 2: L_dis off
    for the last 1/9."""
    cfg: Config = tiny_config(train={"base_iters": 9})
    baseline = STAGES["baseline"].build(cfg, build_detector(cfg.model, 3), CLASSES, {})
    assert isinstance(baseline.model, Baseline) and (baseline.max_iter, baseline.lr_offset) == (9, 0)
    assert baseline.weight_schedules == {}

    step1 = STAGES["step1"].build(cfg, build_detector(cfg.model, 3), CLASSES, {})
    assert isinstance(step1.model, Step1) and (step1.max_iter, step1.lr_offset) == (12, 3)
    assert [step1.weight_schedules["distance"](i) for i in range(12)] == [0.0] * 3 + [1.0] * 9
    written = step1.save_outputs(tmp_path, cfg.model_dump(mode="json"))
    assert written == {"label_encoder": tmp_path / LABEL_ENCODER} and written["label_encoder"].is_file()
    assert dict(STAGES["step1"].outputs) == {"label_encoder": LABEL_ENCODER}

    inputs = {"label_encoder": str(written["label_encoder"])}
    step2 = STAGES["step2"].build(cfg, build_detector(cfg.model, 3), CLASSES, inputs)
    assert isinstance(step2.model, Step2) and isinstance(step2.model.target, LabelEncoderTarget)
    assert (step2.max_iter, step2.lr_offset) == (9, 0)
    assert [step2.weight_schedules["distance"](i) for i in range(9)] == [1.0] * 8 + [0.0]
    assert not any(p.requires_grad for p in step2.model.target.parameters())


def test_step2_without_its_target_file_is_refused_before_anything_is_built(tiny_config) -> None:
    with pytest.raises(UserError, match="step2 needs exactly one of --label-encoder FILE .* or --teacher FILE"):
        runner.train(tiny_config(), "step2", {})
    with pytest.raises(UserError, match="exactly one of"):
        runner.train(tiny_config(), "step2", {"label_encoder": "h.pth", "teacher": "t.pth"})
    with pytest.raises(UserError, match="step2_init_only needs --label-encoder FILE"):
        runner.train(tiny_config(), "step2_init_only", {"teacher": "t.pth"})


@pytest.mark.parametrize(
    "argv",
    [["step2", "c.yaml"], ["step2", "c.yaml", "--label-encoder", "h.pth", "--teacher", "t.pth"],
     ["step2-supervision-only", "c.yaml"], ["step2-init-only", "c.yaml", "--teacher", "t.pth"]],
    ids=["step2-none", "step2-both", "supervision-only-none", "init-only-teacher"],
)
def test_cli_asks_for_exactly_the_stage_inputs(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """step2 takes --label-encoder or --teacher (exactly one); the Table-5 ablations take --label-encoder only."""
    with pytest.raises(SystemExit) as info:
        cli.parse_args(argv)
    assert info.value.code == 2
    assert "--label-encoder" in capsys.readouterr().err


def _half_detection(cfg: Config, detector: nn.Module, class_names: list[str], inputs: Mapping[str, str]) -> Objective:
    model = Baseline(detector)
    model.loss_weights["detection"] = 0.5
    return Objective(model, cfg.train.max_iters)


def test_a_new_stage_is_one_registry_entry(tiny_config, monkeypatch: pytest.MonkeyPatch) -> None:
    """Registering a recipe gives it a CLI command, a pipeline row and a working run, with no other change."""
    monkeypatch.setattr("labelenc.stages.STAGES", dict(STAGES))
    for module in (cli, runner):
        monkeypatch.setattr(module, "STAGES", __import__("labelenc.stages").stages.STAGES)
    register_stage(Stage("half", "half", "the baseline at half the loss", _half_detection,
                         pipeline_rows=(("half 1x", "half_1x", "1x"),)))
    args = cli.build_parser().parse_args(["half", "cfg.yaml", "train.base_iters=2"])
    assert args.command == "half" and args.overrides == ["train.base_iters=2"]

    cfg = tiny_config(train={"base_iters": 2})
    result = runner.train(cfg, "half")
    records = (result.output_dir / "metrics.jsonl").read_text().splitlines()
    assert len(records) == 2 and result.metrics["bbox"]["AP"] is not None
