"""Tests of the labelenc command line: help with examples, one-line errors with exit code 2, data synth."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from labelenc.cli import main, parse_args
from labelenc.config import save_config
from labelenc.data.coco import CocoDetection

SUBCOMMANDS = [["data", "synth"], ["train"], ["eval"], ["step1"], ["step2"], ["pipeline"]]


def _error_lines(stderr: str) -> list[str]:
    """The error lines of stderr (a progress bar may precede one on its terminal line, after a carriage return)."""
    return [line[line.index("labelenc: error:"):] for line in stderr.splitlines() if "labelenc: error:" in line]


def test_top_level_help_lists_commands_and_examples(capsys: pytest.CaptureFixture[str]) -> None:
    """labelenc --help exits 0 and shows every command and usage examples."""
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "examples:" in out
    for command in ("data", "train", "eval", "step1", "step2", "pipeline"):
        assert command in out


@pytest.mark.parametrize("command", SUBCOMMANDS, ids=[" ".join(c) for c in SUBCOMMANDS])
def test_subcommand_help_has_examples(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """Each subcommand's --help exits 0 and shows examples that invoke that very subcommand."""
    with pytest.raises(SystemExit) as info:
        main([*command, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "examples:" in out
    assert f"labelenc {' '.join(command)} " in out.split("examples:")[1]


def test_data_group_help_names_synth(capsys: pytest.CaptureFixture[str]) -> None:
    """labelenc data --help exits 0 and names its synth command."""
    with pytest.raises(SystemExit) as info:
        main(["data", "--help"])
    assert info.value.code == 0
    assert "synth" in capsys.readouterr().out


def test_usage_error_exits_nonzero(capsys: pytest.CaptureFixture[str]) -> None:
    """An unknown command is an argparse usage error with a non-zero exit code."""
    with pytest.raises(SystemExit) as info:
        main(["fly"])
    assert info.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


@pytest.fixture
def config_path(tiny_config, tmp_path: Path) -> Path:
    """The tiny RetinaNet config on the synthetic data, as a YAML file."""
    path = tmp_path / "tiny.yaml"
    save_config(tiny_config(), path)
    return path


def test_bad_config_key_is_one_error_line_and_exit_2(config_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A config key typo returns 2 with one 'labelenc: error:' line naming the key and no traceback."""
    assert main(["train", str(config_path), "train.learning_rate=0.1"]) == 2
    captured = capsys.readouterr()
    assert len(_error_lines(captured.err)) == 1
    assert "train.learning_rate" in captured.err and "base_lr" in captured.err
    assert "Traceback" not in captured.err + captured.out


def test_data_synth_writes_a_dataset(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """labelenc data synth writes train/val JSON and images and prints their paths."""
    out = tmp_path / "synth"
    argv = ["data", "synth", "--out", str(out), "--seed", "1", "--num-train", "3", "--num-val", "2",
            "--image-size", "32", "--num-classes", "2"]
    assert main(argv) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed == {split: str(out / "annotations" / f"instances_{split}.json") for split in ("train", "val")}
    train = CocoDetection(printed["train"], out / "train")
    val = CocoDetection(printed["val"], out / "val")
    assert (len(train), len(val), train.num_classes) == (3, 2, 2)
    assert train[0][0].shape == (3, 32, 32)


def test_train_on_missing_data_exits_2_naming_it(config_path: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """train with an annotation file that does not exist returns 2 and names the file."""
    missing = tmp_path / "nowhere" / "instances_train.json"
    code = main(["train", str(config_path), f"data.train.annotations={missing}", f"output_dir={tmp_path / 'run'}"])
    assert code == 2
    err = capsys.readouterr().err
    assert len(_error_lines(err)) == 1 and str(missing) in err and "Traceback" not in err


def test_eval_of_missing_weights_exits_2_naming_them(config_path: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """eval --weights FILE with no such file returns 2 and names it."""
    weights = tmp_path / "no_such_model.pth"
    assert main(["eval", str(config_path), "--weights", str(weights)]) == 2
    err = capsys.readouterr().err
    assert len(_error_lines(err)) == 1 and str(weights) in err and "Traceback" not in err


@pytest.mark.parametrize("override, key", [("model.anchor_sizes=[8,16]", "model.anchor_sizes"),
                                           ("model.trainable_layers=6", "model.trainable_layers"),
                                           ("model.detector_kwargs.fg_iou=0.6", "model.detector_kwargs.fg_iou")])
def test_model_value_the_detector_cannot_use_exits_2(config_path: Path, tmp_path: Path, override: str, key: str,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """A model value the schema admits but the detector cannot build with is one error line naming the key, exit 2."""
    assert main(["train", str(config_path), override, f"output_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err
    assert len(_error_lines(err)) == 1 and key in err and "Traceback" not in err


def test_unreadable_training_image_in_a_worker_is_one_error_line(
    synth_root: Path, config_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A corrupt training image read by a DataLoader worker gives exit 2 and one line naming it, no traceback.

    The PNGs are truncated after a valid header: the run-start check reads headers only and passes them, so the
    error comes from decoding in a worker (load_image's message, with the image id).
    """
    data = tmp_path / "data"
    shutil.copytree(synth_root, data)
    for image in (data / "train").glob("*.png"):
        image.write_bytes(image.read_bytes()[:100])
    overrides = [f"data.train.annotations={data / 'annotations/instances_train.json'}",
                 f"data.train.images={data / 'train'}", "data.num_workers=2", f"output_dir={tmp_path / 'run'}"]
    assert main(["train", str(config_path), *overrides]) == 2
    err = capsys.readouterr().err
    assert len(_error_lines(err)) == 1 and "Traceback" not in err
    line = _error_lines(err)[0]
    assert line.startswith(f"labelenc: error: cannot read image {data / 'train'}/") and ".png (image id " in line
    assert "image file is truncated" in line  # PIL's decoding error, not the header check's


def test_console_script_is_installed(tmp_path: Path) -> None:
    """The installed labelenc script shows help (exit 0) and turns a missing config into exit 2 with one line."""
    script = Path(sys.executable).parent / "labelenc"
    assert script.is_file(), f"console script missing: {script}"
    ok = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0 and "examples:" in ok.stdout
    missing = tmp_path / "missing.yaml"
    bad = subprocess.run([str(script), "train", str(missing)], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2
    assert _error_lines(bad.stderr) == [f"labelenc: error: config file not found: {missing}"]


@pytest.mark.parametrize("argv, overrides", [
    (["step2", "c.yaml", "--label-encoder", "s1/label_encoder.pth", "output_dir=runs/s2"], ["output_dir=runs/s2"]),
    (["train", "c.yaml", "a=1", "--resume", "b=2"], ["a=1", "b=2"]),
    (["eval", "c.yaml", "--weights", "w.pth", "data.num_workers=0"], ["data.num_workers=0"]),
    (["pipeline", "c.yaml", "--seeds", "0,1", "train.base_iters=3"], ["train.base_iters=3"]),
])
def test_overrides_are_accepted_anywhere_after_the_config(argv: list[str], overrides: list[str]) -> None:
    """key=value overrides may follow options, in command-line order (README: step2 ... --label-encoder F k=v)."""
    assert parse_args(argv).overrides == overrides


def test_an_unknown_option_is_still_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        parse_args(["train", "c.yaml", "--bogus", "k=v"])
    assert info.value.code == 2 and "unrecognized arguments: --bogus" in capsys.readouterr().err
