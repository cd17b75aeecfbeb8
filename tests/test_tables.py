"""``labelenc ablate``: every table runs end to end at tiny size, reuses shared runs, and reports beside the paper."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import tiny_raw

from labelenc import cli
from labelenc.config import build_config
from labelenc.experiments import Experiment, Row, RunSpec, run_config
from labelenc.runner import FINAL_WEIGHTS, SUMMARY
from labelenc.tables import TABLES, table1

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _config(synth_root: Path, root: Path, family: str = "retinanet", **model: object) -> Path:
    raw = tiny_raw(synth_root, root / "runs", family)
    raw["train"].update(base_iters=2, checkpoint_period=100)
    raw["model"].update(model)
    path = root / f"{family}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture(scope="module")
def ablations(synth_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Tables 4 (2 seeds), 6 (2 seeds), 2, 5 and 3 run in that order on one output folder, as a user would."""
    root = tmp_path_factory.mktemp("ablate")
    config = _config(synth_root, root)
    runs = root / "runs"
    codes, mtimes = {}, {}
    codes[4] = cli.main(["ablate", str(config), "--table", "4", "--seeds", "0,1"])
    mtimes["step2"] = (runs / "seed0" / "step2" / FINAL_WEIGHTS).stat().st_mtime_ns
    codes[6] = cli.main(["ablate", str(config), "--table", "6", "--seeds", "0,1"])
    codes[2] = cli.main(["ablate", str(config), "--table", "2"])
    codes[5] = cli.main(["ablate", str(config), "--table", "5"])
    codes[3] = cli.main(["ablate", str(config), "--table", "3", "--other-backbone", "resnet34"])
    mtimes["step2 after"] = (runs / "seed0" / "step2" / FINAL_WEIGHTS).stat().st_mtime_ns
    reports = {n: json.loads((runs / f"table{n}.json").read_text()) for n in codes if codes[n] == 0}
    return {"root": root, "config": config, "runs": runs, "codes": codes, "mtimes": mtimes, "reports": reports}


def test_each_table_runs_and_writes_its_report(ablations: dict) -> None:
    assert ablations["codes"] == {4: 0, 6: 0, 2: 0, 5: 0, 3: 0}
    for n in ablations["codes"]:
        for suffix in ("md", "json"):
            assert (ablations["runs"] / f"table{n}.{suffix}").is_file()
        assert (ablations["runs"] / f"table{n}.png").stat().st_size > 10_000


def test_tables_share_their_common_runs(ablations: dict) -> None:
    """Tables 2, 3, 5 and 6 reuse Table 4's finished baseline, Step 1 and Step 2 instead of training them again."""
    assert ablations["mtimes"]["step2"] == ablations["mtimes"]["step2 after"]
    seed0 = sorted(p.name for p in (ablations["runs"] / "seed0").iterdir())
    assert seed0 == sorted(["baseline_1x", "step1", "step2", "kd", "step1_recon", "step2_from_recon",
                            "step2_supervision_only_from_step1", "step2_init_only_from_step1",
                            "step2_supervision_only_from_step1_recon", "step2_init_only_from_step1_recon",
                            "step1_other", "step2_cross"])
    assert sorted(p.name for p in (ablations["runs"] / "seed1").iterdir()) == ["baseline_1x", "kd", "step1", "step2"]


def test_reports_have_the_papers_rows_numbers_and_paired_intervals(ablations: dict) -> None:
    reports = ablations["reports"]
    assert list(reports[2]["rows"]) == ["baseline 1x", "LabelEnc (full Step 1)", "LabelEnc (reconstruction-only Step 1)"]
    assert reports[2]["rows"]["LabelEnc (reconstruction-only Step 1)"]["paper"] == {"AP": 36.9}
    assert list(reports[4]["rows"]) == ["baseline 1x", "step1-only", "LabelEnc"]
    assert reports[4]["rows"]["step1-only"]["paper"] == {"AP": 37.9}
    assert len(reports[5]["rows"]) == 7 and reports[5]["rows"]["supervision only (full Step 1)"]["paper"] == {"AP": 36.8}
    assert reports[3]["rows"].keys() >= {"LabelEnc, Step 1 on resnet18", "LabelEnc, Step 1 on resnet34"}
    six = reports[6]
    assert list(six["rows"]) == ["baseline 1x", "KD (teacher: resnet18 1x)", "LabelEnc"]
    for comparison in six["comparisons"]:  # two seeds: an interval around the mean of the per-seed differences
        assert len(comparison["differences"]) == 2 and comparison["low"] <= comparison["mean"] <= comparison["high"]
        method, reference = six["rows"][comparison["method"]], six["rows"][comparison["reference"]]
        per_seed = [a - b for a, b in zip(method["per_seed"]["AP"], reference["per_seed"]["AP"])]
        assert comparison["differences"] == pytest.approx(per_seed)
    markdown = (ablations["runs"] / "table6.md").read_text()
    assert "| paper AP |" in markdown and "95% interval" in markdown and "| LabelEnc − KD (teacher: resnet18 1x) |" in markdown
    for run in six["runs"]["kd"]:
        assert Path(run["run_dir"]).name == "kd" and run["seed"] in (0, 1)


def test_the_reconstruction_only_step1_feeds_step2(ablations: dict) -> None:
    seed0 = ablations["runs"] / "seed0"
    assert not (seed0 / "step1_recon" / FINAL_WEIGHTS).exists()  # it trains no image detector
    assert (seed0 / "step2_from_recon" / FINAL_WEIGHTS).is_file()
    assert json.loads((seed0 / "step2_from_recon" / SUMMARY).read_text())["metrics"]["bbox"]["AP"] is not None


def test_table7_is_mask_rcnn_with_box_and_mask_ap(synth_root: Path, tmp_path: Path) -> None:
    config = _config(synth_root, tmp_path, "mask_rcnn", detections_per_image=10)  # untrained: 100 masks per image
    assert cli.main(["ablate", str(config), "--table", "7"]) == 0
    report = json.loads((tmp_path / "runs" / "table7.json").read_text())
    assert list(report["rows"]) == ["baseline 1x", "baseline 2x", "step1-only", "LabelEnc"]
    for row in report["rows"].values():
        assert row["box AP"][0] is not None and row["mask AP"][0] is not None
    assert report["rows"]["LabelEnc"]["paper"] == {"box AP": 39.1, "mask AP": 35.6}
    assert {c["column"] for c in report["comparisons"]} == {"box AP", "mask AP"}


@pytest.mark.parametrize("argv, message", [
    (["--table", "3"], "--table 3 needs --other-backbone"),
    (["--table", "3", "--other-backbone", "resnet18"], "is the config's own backbone"),
    (["--table", "7"], "--table 7 is Mask R-CNN"),
    (["--table", "2", "--teacher", "x.pth"], "--teacher is for table 6"),
    (["--table", "4", "--seeds", "0,x"], "expected comma-separated integers"),
    (["--table", "3", "--other-backbone", "resnet7"], "model.backbone"),
])
def test_bad_ablate_arguments_are_one_clear_error_before_any_run(
    argv: list[str], message: str, synth_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    config = _config(synth_root, tmp_path)
    assert cli.main(["ablate", str(config), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists()


def test_a_table_number_the_paper_lacks_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["ablate", "c.yaml", "--table", "8"])
    assert exit_info.value.code == 2 and "invalid choice: 8" in capsys.readouterr().err


def test_every_table_is_a_consistent_experiment(synth_root: Path, tmp_path: Path) -> None:
    """Rows name runs, inputs come from earlier runs, and every run's config builds."""
    cfg = build_config(tiny_raw(synth_root, tmp_path))
    for number, build in TABLES.items():
        if number == 7:
            cfg_n = build_config({**tiny_raw(synth_root, tmp_path, "mask_rcnn")})
        else:
            cfg_n = cfg
        experiment = build(cfg_n, "resnet34")
        experiment.check()
        for run in experiment.runs:
            run_config(cfg_n, run, tmp_path / run.name, 0)
    table1(cfg).check()
    with pytest.raises(ValueError, match="not an earlier run"):
        Experiment("bad", (RunSpec("b", "step2", inputs={"label_encoder": "a"}), RunSpec("a", "step1")),
                   (Row("b", "b"),)).check()


def test_a_finished_run_of_other_inputs_is_not_reused(ablations: dict, capsys: pytest.CaptureFixture[str]) -> None:
    """Table 6 with --teacher in the folder whose kd run learned from the baseline: an error naming the run."""
    seed0 = ablations["runs"] / "seed0"
    kd = (seed0 / "kd" / FINAL_WEIGHTS).stat().st_mtime_ns
    teacher = seed0 / "step2" / FINAL_WEIGHTS
    assert cli.main(["ablate", str(ablations["config"]), "--table", "6", "--teacher", str(teacher)]) == 2
    err = capsys.readouterr().err
    assert f"{seed0 / 'kd'} holds a finished run of this config, but its teacher was" in err and str(teacher) in err
    assert (seed0 / "kd" / FINAL_WEIGHTS).stat().st_mtime_ns == kd


def test_a_given_teacher_that_does_not_fit_is_refused_before_anything_trains(
    ablations: dict, synth_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    config = _config(synth_root, tmp_path)
    label_encoder = ablations["runs"] / "seed0" / "step1" / "label_encoder.pth"
    assert cli.main(["ablate", str(config), "--table", "6", "--teacher", str(label_encoder)]) == 2
    assert "label-encoder" in capsys.readouterr().err.lower()
    assert not (tmp_path / "runs").exists()


def test_fcos_table4_quotes_one_fcos_version(synth_root: Path, tmp_path: Path) -> None:
    """The paper's step1-only FCOS number is for its plain FCOS: Table 4 quotes that FCOS's baseline and LabelEnc."""
    raw = tiny_raw(synth_root, tmp_path, "fcos")
    experiment = TABLES[4](build_config(raw), None)
    assert [row.paper for row in experiment.rows] == [{"AP": 36.7}, {"AP": 38.0}, {"AP": 38.9}]
    assert "plain FCOS" in experiment.paper_source
    assert table1(build_config(raw)).rows[0].paper == {"AP": 38.7}  # Table 1: torchvision's is the improved FCOS
