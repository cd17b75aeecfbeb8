"""The four-run comparison end to end on a tiny CPU config: runs, report files, reuse, seeds."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import tiny_raw

from labelenc.config import build_config
from labelenc.engine.checkpoint import load_file
from labelenc.errors import UserError
from labelenc.experiments import _detection_loss
from labelenc.pipeline import run_pipeline
from labelenc.runner import FINAL_WEIGHTS, SUMMARY, machine_description
from labelenc.stages import LABEL_ENCODER


ROWS = ["baseline 1x", "baseline 2x", "step1-only", "LabelEnc"]
RUN_DIRS = ["baseline_1x", "baseline_2x", "step1", "step2"]


@pytest.fixture
def tiny_pipeline_config(synth_root: Path, tmp_path: Path):
    raw = tiny_raw(synth_root, tmp_path / "pipeline")
    raw["train"].update(base_iters=2, checkpoint_period=100)
    return build_config(raw)


def test_pipeline_runs_all_four_and_reports(tiny_pipeline_config, capsys: pytest.CaptureFixture[str]) -> None:
    """Baseline 1x/2x, Step 1 and Step 2 run with the right lengths; md/json/png reports hold the four rows."""
    root = Path(tiny_pipeline_config.output_dir)
    report = run_pipeline(tiny_pipeline_config, seeds=[0])
    assert list(report["rows"]) == ROWS
    iterations = {row: stats["iterations"] for row, stats in report["rows"].items()}
    warmup = round(tiny_pipeline_config.labelenc.step1_warmup * 2)
    assert iterations == {"baseline 1x": 2, "baseline 2x": 4, "step1-only": 2 + warmup, "LabelEnc": 2}
    for name in RUN_DIRS:
        run_dir = root / "seed0" / name
        assert (run_dir / FINAL_WEIGHTS).is_file() and (run_dir / SUMMARY).is_file()
    assert (root / "seed0" / "step1" / LABEL_ENCODER).is_file()
    saved = json.loads((root / "report.json").read_text())
    assert saved["rows"].keys() == report["rows"].keys()
    markdown = (root / "report.md").read_text()
    assert all(f"| {row} |" in markdown for row in ROWS)
    assert (root / "report.png").stat().st_size > 10_000
    for row, stats in report["rows"].items():
        ap = stats["AP"][0]
        assert 0.0 <= ap <= 100.0
        assert f"{ap:.1f}" in markdown.split(f"| {row} |")[1].splitlines()[0]
    assert "| LabelEnc |" in capsys.readouterr().out


def test_the_loss_curves_sum_the_detection_terms_only() -> None:
    """The picture's loss of a metrics record: detection terms, not the gradient norm, skipped fraction, LR, timing,
    the distance or Step 1's reconstruction terms."""
    record = {"iteration": 20, "classification": 0.25, "bbox_regression": 0.5, "reconstruction_classification": 2.0,
              "feature_distance": 3.0, "loss": 5.75, "lr": 0.1, "time": 0.3, "data_time": 0.1, "skipped": 0.05,
              "grad_norm": 40.0}
    assert _detection_loss(record) == 0.75


def test_pipeline_reuses_finished_runs_and_reports_seed_statistics(
    tiny_pipeline_config, caplog: pytest.LogCaptureFixture
) -> None:
    """A second call reuses finished runs (and says which it trains); several seeds give mean ± std over per-seed
    runs."""
    root = Path(tiny_pipeline_config.output_dir)
    run_pipeline(tiny_pipeline_config, seeds=[0])
    first = (root / "seed0" / "baseline_1x" / FINAL_WEIGHTS).stat().st_mtime_ns
    caplog.clear()
    report = run_pipeline(tiny_pipeline_config, seeds=[0, 1])
    assert "4 run(s) reused, 4 to train\n" + "".join(f"  {root / 'seed1' / run}\n" for run in RUN_DIRS) in (
        caplog.text)
    assert (root / "seed0" / "baseline_1x" / FINAL_WEIGHTS).stat().st_mtime_ns == first
    assert (root / "seed1" / "step2" / FINAL_WEIGHTS).is_file()
    for row, stats in report["rows"].items():
        runs = report["runs"][stats["run"]]
        assert [r["seed"] for r in runs] == [0, 1]
        values = [100 * r["metrics"]["bbox"]["AP"] for r in runs]
        mean, std = report["rows"][row]["AP"]
        assert mean == pytest.approx(sum(values) / 2)
        assert std == pytest.approx(abs(values[0] - values[1]) / 2 ** 0.5)
    markdown = (root / "report.md").read_text()
    assert "±" in markdown
    first = report["comparisons"][0]  # the fair comparison: LabelEnc − baseline 2x, per seed, 12.706 * sd / sqrt(2)
    assert (first["method"], first["reference"]) == ("LabelEnc", "baseline 2x")
    differences = [a - b for a, b in zip(report["rows"]["LabelEnc"]["per_seed"]["AP"],
                                         report["rows"]["baseline 2x"]["per_seed"]["AP"])]
    assert first["differences"] == pytest.approx(differences)
    half = 12.706 * abs(differences[0] - differences[1]) / 2 ** 0.5 / 2 ** 0.5
    assert (first["low"], first["high"]) == (pytest.approx(first["mean"] - half), pytest.approx(first["mean"] + half))
    assert f"| LabelEnc − baseline 2x | AP |" in markdown and first["verdict"] in markdown
    schedule = report["comparisons"][2]  # how near convergence the baselines are: what doubling the schedule adds
    assert (schedule["method"], schedule["reference"]) == ("baseline 2x", "baseline 1x")
    assert schedule["differences"] == pytest.approx([a - b for a, b in zip(
        report["rows"]["baseline 2x"]["per_seed"]["AP"], report["rows"]["baseline 1x"]["per_seed"]["AP"])])
    assert "| baseline 2x − baseline 1x | AP |" in markdown and "the paper compares where that is 0 to 0.9" in markdown
    assert f"Trained on: {report['runs']['baseline_1x'][0]['machine']} (8 runs).\n" in markdown


def test_the_report_says_where_reused_runs_trained(tiny_pipeline_config) -> None:
    """Runs reused from elsewhere keep their own machines in the report, apart from the machine writing it; a run
    resumed on another machine counts for both."""
    root = Path(tiny_pipeline_config.output_dir)
    run_pipeline(tiny_pipeline_config, seeds=[0])
    here, gpu = machine_description(), "gpu-node (x86_64, 16 threads, CUDA H100)"
    first, second = sorted((root / "seed0").glob(f"*/{SUMMARY}"))[:2]
    summary = json.loads(first.read_text())
    summary["trained_on"] = [{"machine": gpu, "iterations": [0, 1], "wall_time": 1.0}] + summary["trained_on"]
    first.write_text(json.dumps(summary))
    summary = json.loads(second.read_text())
    del summary["machine"], summary["trained_on"]  # a summary written before summaries recorded machines
    second.write_text(json.dumps(summary))
    markdown = run_pipeline(tiny_pipeline_config, seeds=[0])["markdown"]
    assert (f"Trained on: {gpu} (1 run); {here} (3 runs); not recorded (1 run).\n"
            f"Report written on: {here};") in markdown


def test_pipeline_with_a_given_label_encoder_skips_step1(tiny_pipeline_config, tmp_path: Path) -> None:
    """--label-encoder reuses a Step-1 file and --skip-baselines runs Step 2 alone."""
    run_pipeline(tiny_pipeline_config, seeds=[0], skip_baselines=True)
    encoder = Path(tiny_pipeline_config.output_dir) / "seed0" / "step1" / LABEL_ENCODER
    other = tiny_pipeline_config.model_copy(update={"output_dir": str(tmp_path / "other")})
    report = run_pipeline(other, seeds=[0], skip_baselines=True, label_encoder=str(encoder))
    assert list(report["rows"]) == ["LabelEnc"]
    assert not (tmp_path / "other" / "seed0" / "step1").exists()


def test_a_damaged_run_summary_is_named_not_a_traceback(tiny_pipeline_config) -> None:
    """A run folder whose summary is garbage (a copy cut short) is one error naming the folder."""
    root = Path(tiny_pipeline_config.output_dir)
    run_pipeline(tiny_pipeline_config, seeds=[0], skip_baselines=True)
    (root / "seed0" / "step1" / SUMMARY).write_bytes(b"\x00\xff{not json")
    with pytest.raises(UserError, match=f"{root / 'seed0' / 'step1'} holds a damaged run"):
        run_pipeline(tiny_pipeline_config, seeds=[0], skip_baselines=True)


def test_a_moved_experiment_folder_is_reused_as_it_is(tiny_pipeline_config, tmp_path: Path) -> None:
    """Runs moved to another folder (Step 2's label encoder with them) are reused: nothing is trained or evaluated
    again, and every file of every run stays as it was."""
    first = run_pipeline(tiny_pipeline_config, seeds=[0])
    moved = tmp_path / "moved"
    shutil.move(tiny_pipeline_config.output_dir, moved)
    before = {p: p.read_bytes() for p in (moved / "seed0").rglob("*") if p.is_file()}
    report = run_pipeline(tiny_pipeline_config.model_copy(update={"output_dir": str(moved)}), seeds=[0])
    assert {p: p.read_bytes() for p in (moved / "seed0").rglob("*") if p.is_file()} == before
    assert report["rows"] == first["rows"]


def test_moved_run_records_without_weights_are_reused(tiny_pipeline_config, tmp_path: Path) -> None:
    """Run folders moved without their .pth files (records banked apart from the weights) are reused: Step 2's
    label encoder is known by the SHA-256 that Step 1's summary recorded writing. A Step 1 that records writing
    another encoder is named, not reused."""
    first = run_pipeline(tiny_pipeline_config, seeds=[0])
    moved = tmp_path / "moved"
    shutil.move(tiny_pipeline_config.output_dir, moved)
    for weights in moved.rglob("*.pth"):
        weights.unlink()
    before = {p: p.read_bytes() for p in (moved / "seed0").rglob("*") if p.is_file()}
    cfg = tiny_pipeline_config.model_copy(update={"output_dir": str(moved)})
    assert run_pipeline(cfg, seeds=[0])["rows"] == first["rows"]
    assert {p: p.read_bytes() for p in (moved / "seed0").rglob("*") if p.is_file()} == before

    step1 = moved / "seed0" / "step1" / SUMMARY
    summary = json.loads(step1.read_text())
    summary["outputs"]["label_encoder"]["sha256"] = "0" * 64
    step1.write_text(json.dumps(summary))
    with pytest.raises(UserError, match=f"{moved / 'seed0' / 'step2'} holds a finished run of this config, but its "
                                        f"label_encoder was .* that {step1} records writing"):
        run_pipeline(cfg, seeds=[0])


def test_a_finished_step2_of_another_label_encoder_is_named_not_reused(tiny_pipeline_config) -> None:
    """Step 1's label_encoder.pth changed after Step 2 trained from it: an error naming the run and the file."""
    root = Path(tiny_pipeline_config.output_dir)
    run_pipeline(tiny_pipeline_config, seeds=[0], skip_baselines=True)
    encoder = root / "seed0" / "step1" / LABEL_ENCODER
    encoder.write_bytes(encoder.read_bytes() + b"another file")
    summary = (root / "seed0" / "step2" / SUMMARY).read_text()
    with pytest.raises(UserError, match=f"{root / 'seed0' / 'step2'} holds a finished run of this config, but its "
                                        f"label_encoder was {encoder} \\(sha256 "):
        run_pipeline(tiny_pipeline_config, seeds=[0], skip_baselines=True)
    assert (root / "seed0" / "step2" / SUMMARY).read_text() == summary


def test_a_summary_that_recorded_input_paths_alone_is_compared_by_path(tiny_pipeline_config) -> None:
    """Summaries written before input contents were recorded hold paths: the same path is the same input."""
    root = Path(tiny_pipeline_config.output_dir)
    run_pipeline(tiny_pipeline_config, seeds=[0], skip_baselines=True)
    path = root / "seed0" / "step2" / SUMMARY
    summary = json.loads(path.read_text())
    summary["inputs"] = {"label_encoder": str((root / "seed0" / "step1" / LABEL_ENCODER).resolve())}
    path.write_text(json.dumps(summary))
    run_pipeline(tiny_pipeline_config, seeds=[0], skip_baselines=True)
    assert json.loads(path.read_text()) == summary


def test_an_interrupted_pipeline_resumes_its_unfinished_run(tiny_pipeline_config) -> None:
    """A pipeline killed in Step 2 (its checkpoint kept, no summary) continues that run on the next call and ends
    with the weights of the uninterrupted one."""
    cfg = tiny_pipeline_config.model_copy(update={"train": tiny_pipeline_config.train.model_copy(
        update={"checkpoint_period": 1})})
    root = Path(cfg.output_dir)
    run_pipeline(cfg, seeds=[0], skip_baselines=True)
    step2 = root / "seed0" / "step2"
    finished = load_file(step2 / FINAL_WEIGHTS)["model"]
    checkpoints = sorted(step2.glob("checkpoint_*.pth"))
    assert len(checkpoints) >= 2
    for path in [step2 / FINAL_WEIGHTS, step2 / SUMMARY, step2 / "model_final_eval.json", checkpoints[-1]]:
        path.unlink()
    (step2 / "last_checkpoint").write_text(checkpoints[-2].name)
    run_pipeline(cfg, seeds=[0], skip_baselines=True)
    resumed = load_file(step2 / FINAL_WEIGHTS)["model"]
    assert all(torch.equal(resumed[k], finished[k]) for k in finished)


def test_jobs_train_runs_in_parallel_with_the_same_numbers(synth_root: Path, tmp_path: Path) -> None:
    """--jobs 2 trains the four runs in two worker processes; with train.threads fixed, every run's metrics and
    weights equal those of the sequential pipeline."""
    reports = {}
    for jobs in (1, 2):
        raw = tiny_raw(synth_root, tmp_path / f"jobs{jobs}")
        raw["train"].update(base_iters=2, checkpoint_period=100, threads=1)
        reports[jobs] = run_pipeline(build_config(raw), seeds=[0], jobs=jobs)
    for name in RUN_DIRS:
        sequential = load_file(tmp_path / "jobs1" / "seed0" / name / FINAL_WEIGHTS)["model"]
        parallel = load_file(tmp_path / "jobs2" / "seed0" / name / FINAL_WEIGHTS)["model"]
        assert all(torch.equal(sequential[k], parallel[k]) for k in sequential), name
    assert ([r["metrics"] for runs in reports[1]["runs"].values() for r in runs]
            == [r["metrics"] for runs in reports[2]["runs"].values() for r in runs])
    assert all("1 threads" in r["machine"] for runs in reports[2]["runs"].values() for r in runs)


def test_a_failing_parallel_run_is_reported_and_the_others_are_kept(synth_root: Path, tmp_path: Path) -> None:
    """One run of a --jobs experiment fails on bad input: its error reaches the caller, the run beside it finishes."""
    from labelenc.experiments import Experiment, Row, RunSpec, run_experiment

    raw = tiny_raw(synth_root, tmp_path / "failing")
    raw["train"].update(base_iters=2, checkpoint_period=100, threads=1)
    experiment = Experiment("two runs", (RunSpec("good", "baseline"),
                                         RunSpec("bad", "baseline", overrides={"model.num_classes": 99})),
                            (Row("good", "good"), Row("bad", "bad")))
    with pytest.raises(UserError, match="model.num_classes=99"):
        run_experiment(build_config(raw), experiment, [0], jobs=2)
    assert (tmp_path / "failing" / "seed0" / "good" / SUMMARY).is_file()
    assert not (tmp_path / "failing" / "seed0" / "bad" / SUMMARY).exists()


def test_train_threads_applies_to_the_run_and_is_restored(tiny_pipeline_config) -> None:
    """train.threads sets torch's CPU threads while the run trains (its summary says so), and not after it."""
    from labelenc import runner

    cfg = tiny_pipeline_config.model_copy(update={"train": tiny_pipeline_config.train.model_copy(
        update={"threads": 2})})
    before = torch.get_num_threads()
    result = runner.train(cfg)
    assert "2 threads" in json.loads((result.output_dir / SUMMARY).read_text())["machine"]
    assert torch.get_num_threads() == before


def _children(pid: int) -> list[int]:
    """Process ids whose parent is ``pid`` (Linux /proc)."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process has ended meanwhile
            continue
        if int(fields[1]) == pid:
            children.append(int(stat.parent.name))
    return children


@pytest.mark.parametrize("reached", ["group", "workers"])
def test_ctrl_c_during_jobs_is_one_message_and_the_rerun_resumes(synth_root: Path, tmp_path: Path,
                                                                   reached: str) -> None:
    """Ctrl-C while one worker trains the last run (writing a checkpoint every 2 iterations) and the other waits
    idle: exit 130 with one "interrupted" line and no traceback; the same command then resumes the unfinished run
    and finishes. The signal reaches the terminal's whole process group, or the workers alone: then the parent
    learns of it from the interrupted worker, as it does when a worker's signal is handled before its own."""
    raw = tiny_raw(synth_root, tmp_path / "run")
    raw["train"].update(base_iters=100, checkpoint_period=2, keep_checkpoints=1, threads=1)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(raw))
    command = [sys.executable, "-m", "labelenc.cli", "pipeline", str(config), "--jobs", "2"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    runs = tmp_path / "run" / "seed0"
    deadline = time.monotonic() + 300
    while not (runs / "step2" / SUMMARY).exists():  # Step 2 (100 iterations) ends before the 2x baseline (200)
        assert proc.poll() is None and time.monotonic() < deadline, "step2 did not finish in time"
        time.sleep(0.05)
    time.sleep(1.0)  # past the end of Step 2's job: its worker now waits for another
    assert not (runs / "baseline_2x" / SUMMARY).exists(), "the 2x baseline finished first: no idle worker"
    if reached == "group":
        os.killpg(proc.pid, signal.SIGINT)
    else:
        for pid in _children(proc.pid):
            os.kill(pid, signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-3000:]
    shown = stderr[max(0, stderr.find("Traceback") - 500):][:4000] if "Traceback" in stderr else stderr[-3000:]
    assert "Traceback" not in stderr and stderr.count("labelenc: interrupted") == 1, shown
    assert not (tmp_path / "run" / "report.md").exists()
    rerun = subprocess.run(command, env=env, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resumed from" in rerun.stderr and (tmp_path / "run" / "report.md").is_file()
