"""Resuming and evaluating never damage a run: the run's own config is the truth, broken files are set aside or
named, and every refusal is one line (exit 2) before anything is written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import tiny_raw

from labelenc.cli import main
from labelenc.config import build_config, save_config
from labelenc.data.loader import build_datasets, build_train_loader
from labelenc.engine.checkpoint import load_file, save_file
from labelenc.runner import FINAL_WEIGHTS, SUMMARY, machine_description, train
from labelenc.stages import LABEL_ENCODER


def _error_lines(stderr: str) -> list[str]:
    return [line[line.index("labelenc: error:"):] for line in stderr.splitlines() if "labelenc: error:" in line]


def _refused(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Run the CLI expecting exit 2 with exactly one error line and no traceback; return that line."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(_error_lines(err)) == 1, err
    return _error_lines(err)[0]


@pytest.fixture(scope="module")
def finished(synth_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 4-iteration RetinaNet run (checkpoints at 2 and 4) and a Step-1 run; tests work on copies."""
    root = tmp_path_factory.mktemp("finished")
    raw = tiny_raw(synth_root, root / "run")
    raw["train"].update(base_iters=4, checkpoint_period=2)
    cfg = build_config(raw)
    train(cfg)
    save_config(cfg, root / "run.yaml")
    train(build_config({**raw, "output_dir": str(root / "s1")}), "step1")
    return root


def _interrupted_copy(finished: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the run as if killed in iteration 4 (its config file pointing at the copy)."""
    run = tmp_path / "run"
    shutil.copytree(finished / "run", run)
    for name in (FINAL_WEIGHTS, "model_final_eval.json", SUMMARY, "checkpoint_0000004.pth"):
        (run / name).unlink()
    (run / "last_checkpoint").write_text("checkpoint_0000002.pth")
    config = tmp_path / "run.yaml"
    config.write_text((finished / "run.yaml").read_text().replace(str(finished / "run"), str(run)))
    return run, config


@pytest.mark.parametrize("override", ["model.fpn_channels=32", "train.base_lr=0.5"])
def test_resume_with_a_changed_config_is_refused_and_config_yaml_kept(
    finished: Path, tmp_path: Path, override: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A change to what is trained is refused key by key; the run's config.yaml is left byte for byte."""
    run, config = _interrupted_copy(finished, tmp_path)
    before = (run / "config.yaml").read_bytes()
    line = _refused(["train", str(config), "--resume", override], capsys)
    key = override.split("=")[0]
    assert key in line and "config.yaml" in line and "--resume" in line
    assert (run / "config.yaml").read_bytes() == before
    assert not (run / FINAL_WEIGHTS).exists()


def test_resume_with_a_harmless_change_is_recorded_beside_the_config(finished: Path, tmp_path: Path) -> None:
    run, config = _interrupted_copy(finished, tmp_path)
    before = (run / "config.yaml").read_bytes()
    assert main(["train", str(config), "--resume", "train.log_period=2", "data.num_workers=0"]) == 0
    assert (run / "config.yaml").read_bytes() == before
    amendments = [json.loads(line) for line in (run / "config_amendments.jsonl").read_text().splitlines()]
    assert amendments[0]["changes"] == {"train.log_period": {"run": 1, "now": 2}}  # num_workers was 0 already
    final, uninterrupted = load_file(run / FINAL_WEIGHTS)["model"], load_file(finished / "run" / FINAL_WEIGHTS)["model"]
    assert all(torch.equal(final[k], uninterrupted[k]) for k in final)


def test_garbage_pointer_and_truncated_latest_checkpoint_fall_back_to_one_that_loads(
    finished: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Binary garbage in last_checkpoint and a truncated newest checkpoint: resume from the previous one, say so,
    set the broken file aside, remove a killed save's *.tmp, and still end with the uninterrupted weights."""
    run, config = _interrupted_copy(finished, tmp_path)
    (run / "last_checkpoint").write_bytes(b"\xff\xfe\x00garbage\x80")
    intact = (finished / "run" / "checkpoint_0000004.pth").read_bytes()
    (run / "checkpoint_0000003.pth").write_bytes(intact[: len(intact) // 2])  # newest by name, truncated
    leftover = run / ".checkpoint_0000004.pth.abc123.tmp"
    leftover.write_bytes(intact[:1000])

    assert main(["train", str(config), "--resume"]) == 0
    assert "checkpoint_0000003.pth" in caplog.text and "set aside" in caplog.text
    assert (run / "checkpoint_0000003.pth.broken").is_file() and not leftover.exists()
    final, uninterrupted = load_file(run / FINAL_WEIGHTS)["model"], load_file(finished / "run" / FINAL_WEIGHTS)["model"]
    assert all(torch.equal(final[k], uninterrupted[k]) for k in final)
    summary = json.loads((run / SUMMARY).read_text())
    assert summary["wall_time"] > summary["wall_time_this_process"] > 0  # the work before the kill is counted


@pytest.mark.parametrize("recorded", [True, False])
def test_a_run_resumed_elsewhere_names_every_machine_it_trained_on(
    finished: Path, tmp_path: Path, recorded: bool
) -> None:
    """The summary of a run resumed on another machine lists both, with the iterations each trained; a checkpoint
    written before machines were recorded counts its iterations as trained on a machine not recorded."""
    run, config = _interrupted_copy(finished, tmp_path)
    checkpoint = run / "checkpoint_0000002.pth"
    state = load_file(checkpoint)
    [earlier] = state.pop("trained_on")
    assert earlier["iterations"] == [0, 2] and earlier["wall_time"] == pytest.approx(state["wall_time"], abs=0.1)
    if recorded:
        state["trained_on"] = [{**earlier, "machine": "gpu-node (x86_64, 16 threads, CUDA H100)"}]
    save_file(state, checkpoint)

    assert main(["train", str(config), "--resume"]) == 0
    summary = json.loads((run / SUMMARY).read_text())
    first, second = summary["trained_on"]
    assert first["machine"] == ("gpu-node (x86_64, 16 threads, CUDA H100)" if recorded else "not recorded")
    assert first["iterations"] == [0, 2] and second["iterations"] == [2, 4]
    assert second["machine"] == summary["machine"] == machine_description(torch.device("cpu"))
    assert summary["wall_time"] == pytest.approx(state["wall_time"] + summary["wall_time_this_process"])


@pytest.mark.parametrize("what", ["label_encoder", "text", "other_family"])
def test_eval_of_the_wrong_file_is_one_line_saying_what_it_is(
    finished: Path, synth_root: Path, tmp_path: Path, what: str, capsys: pytest.CaptureFixture[str]
) -> None:
    config = finished / "run.yaml"
    if what == "label_encoder":
        weights, expected = finished / "s1" / LABEL_ENCODER, "is a label-encoder file"
    elif what == "text":
        weights, expected = tmp_path / "weights.pth", "looks like text"
        weights.write_text("these are not weights\n")
    else:
        weights, expected = finished / "run" / FINAL_WEIGHTS, "family: weights 'retinanet', config 'fcos'; fpn_channels"
        config = tmp_path / "fcos.yaml"
        save_config(build_config(tiny_raw(synth_root, tmp_path / "fcos", "fcos")), config)
    line = _refused(["eval", str(config), "--weights", str(weights)], capsys)
    assert str(weights) in line and expected in line


def test_unreadable_image_during_training_saves_the_state_and_resume_loses_nothing(
    synth_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An image that passes the header check but cannot be decoded stops the run with its state saved; after the
    file is fixed, --resume ends with the weights of a run that never met it."""
    data = tmp_path / "data"
    shutil.copytree(synth_root, data)
    raw = tiny_raw(data, tmp_path / "run")
    raw["train"].update(base_iters=8, checkpoint_period=100)
    config = tmp_path / "run.yaml"
    save_config(build_config(raw), config)
    reference = train(build_config({**raw, "output_dir": str(tmp_path / "reference")}))

    cfg = build_config(raw)
    train_set, _ = build_datasets(cfg, with_masks=False)
    _, targets = next(iter(build_train_loader(train_set, cfg, start_iter=0)))
    first_batch = {int(t["image_id"]) for t in targets}  # a victim outside it is met after iteration 0
    victim_id = next(i for i in train_set.image_ids if i not in first_batch)
    victim = data / "train" / train_set.coco.imgs[victim_id]["file_name"]
    intact = victim.read_bytes()
    victim.write_bytes(intact[:100])  # the PNG header survives: the start-of-run check passes

    line = _refused(["train", str(config)], capsys)
    assert f"cannot read image {victim}" in line and "--resume" in line
    saved = sorted((tmp_path / "run").glob("checkpoint_*.pth"))
    assert len(saved) == 1 and str(saved[0]) in line
    stopped_at = load_file(saved[0])["iteration"]
    assert 0 < stopped_at < 8

    victim.write_bytes(intact)
    assert main(["train", str(config), "--resume"]) == 0
    final, expected = load_file(tmp_path / "run" / FINAL_WEIGHTS)["model"], load_file(reference.weights)["model"]
    assert all(torch.equal(final[k], expected[k]) for k in final)


def test_a_run_that_fails_validation_leaves_no_folder(synth_root: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    raw = tiny_raw(synth_root, tmp_path / "run")
    raw["data"]["val"]["images"] = str(tmp_path / "missing")
    config = tmp_path / "run.yaml"
    save_config(build_config(raw), config)
    _refused(["train", str(config)], capsys)
    assert not (tmp_path / "run").exists()
