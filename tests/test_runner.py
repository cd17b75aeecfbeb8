"""labelenc.runner: a training run's files, and evaluation of its weights reproducing the end-of-training numbers."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import voc_xml, write_image

from labelenc.config import load_config
from labelenc.data.loader import build_datasets, build_val_dataset
from labelenc.engine.checkpoint import load_file, save_file
from labelenc.errors import UserError
from labelenc import runner
from labelenc.models import build_detector
from labelenc.runner import FINAL_WEIGHTS, SUMMARY, evaluate, machine_description, train
from labelenc.stages import read_detector_weights


@pytest.mark.parametrize("family", ["fcos", "mask_rcnn"])
def test_eval_of_final_weights_reproduces_training_metrics(family: str, tiny_config) -> None:
    """`labelenc eval` on model_final.pth (and on the last checkpoint) gives exactly the numbers training printed."""
    # 10 detections: an untrained Mask R-CNN keeps all 100, and pasting their masks dominated the test's time
    cfg = tiny_config(family, train={"base_iters": 3, "checkpoint_period": 3}, model={"detections_per_image": 10})
    result = train(cfg)
    assert set(result.metrics) == ({"bbox", "segm"} if family == "mask_rcnn" else {"bbox"})
    assert evaluate(cfg, result.weights) == result.metrics
    assert evaluate(cfg, result.output_dir / "checkpoint_0000003.pth") == result.metrics
    saved = json.loads((result.output_dir / "model_final_eval.json").read_text())
    assert saved == result.metrics


def test_run_directory_records_config_and_summary(tiny_config) -> None:
    """Every run writes its resolved config (reloadable, equal) and a summary beside its outputs."""
    cfg = tiny_config(train={"base_iters": 2})
    result = train(cfg)
    assert load_config(result.output_dir / "config.yaml") == cfg
    summary = json.loads((result.output_dir / SUMMARY).read_text())
    assert summary["stage"] == "baseline" and summary["iterations"] == 2
    assert summary["metrics"] == result.metrics
    assert summary["machine"] == machine_description(torch.device("cpu"))  # where it trained: the config's device
    assert "CPU" in summary["machine"] and torch.__version__ in summary["machine"]
    [session] = summary["trained_on"]  # one process trained every iteration
    assert session["machine"] == summary["machine"] and session["iterations"] == [0, 2]
    assert 0 < session["wall_time"] <= summary["wall_time"]
    weights = result.output_dir / FINAL_WEIGHTS  # what it wrote, known by content wherever it is moved
    assert summary["outputs"] == {"detector": {"path": str(weights.resolve()),
                                               "sha256": hashlib.sha256(weights.read_bytes()).hexdigest()}}
    records = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records] == [1, 2]
    assert {"loss", "lr", "classification", "bbox_regression"} <= set(records[0])
    assert (result.output_dir / FINAL_WEIGHTS).is_file()
    assert yaml.safe_load((result.output_dir / "config.yaml").read_text())["output_dir"] == cfg.output_dir


def test_init_weights_loads_the_detector_and_starts_at_iteration_zero(tiny_config, tmp_path) -> None:
    """``init_weights`` (detectron2's "load") takes a finished run's detector and trains a new run from iteration 0."""
    source = train(tiny_config(train={"base_iters": 2}, output_dir=str(tmp_path / "source")))
    frozen = {"base_lr": 1e-20, "momentum": 0.0, "weight_decay": 0.0, "base_iters": 3}  # parameters cannot move
    result = train(tiny_config(train=frozen, output_dir=str(tmp_path / "loaded")), init_weights=source.weights)
    records = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records] == [1, 2, 3]
    start, end = load_file(source.weights)["model"], load_file(result.weights)["model"]
    params = [k for k in start if "running_" not in k and "num_batches" not in k]
    assert all(torch.allclose(start[k], end[k], atol=1e-6) for k in params)
    fresh = load_file(train(tiny_config(train=frozen, output_dir=str(tmp_path / "fresh"))).weights)["model"]
    assert not all(torch.allclose(start[k], fresh[k], atol=1e-6) for k in params)


def test_init_weights_of_another_detector_is_one_clear_error(tiny_config, tmp_path) -> None:
    source = train(tiny_config(train={"base_iters": 1}, output_dir=str(tmp_path / "source")))
    other = tiny_config("fcos", train={"base_iters": 1}, output_dir=str(tmp_path / "other"))
    with pytest.raises(UserError, match=f"{source.weights} does not fit the detector of this config"):
        train(other, init_weights=source.weights)


def test_a_failing_evaluation_never_loses_the_weights(tiny_config, synth_root, tmp_path) -> None:
    """Evaluation runs after the final weights and checkpoint are written: when it fails (a val image whose header
    is fine but whose data is truncated), they are on disk, and ``resume`` evaluates them without retraining."""
    val = tmp_path / "val"
    shutil.copytree(synth_root / "val", val)
    image = sorted(val.glob("*.png"))[0]
    intact = image.read_bytes()
    image.write_bytes(intact[: len(intact) // 2])
    cfg = tiny_config(train={"base_iters": 2, "checkpoint_period": 5}, data={"val": {
        "annotations": str(synth_root / "annotations/instances_val.json"), "images": str(val)}})
    with pytest.raises(UserError, match=f"cannot read image {image}"):
        train(cfg)
    out = Path(cfg.output_dir)
    assert (out / FINAL_WEIGHTS).is_file() and (out / "checkpoint_0000002.pth").is_file()
    assert not (out / SUMMARY).exists()
    weights = (out / FINAL_WEIGHTS).read_bytes()

    image.write_bytes(intact)
    result = train(cfg, resume=True)
    assert (out / FINAL_WEIGHTS).read_bytes() == weights
    assert json.loads((out / SUMMARY).read_text())["metrics"] == result.metrics


def test_eval_takes_the_categories_from_the_weights_and_never_reads_the_training_split(
    tiny_config, tmp_path: Path
) -> None:
    """Weights record their category ids: eval reads and checks only data.val (data.train may be gone) and gives
    the numbers training printed, for the final weights and a checkpoint. (Mask R-CNN's segm metrics go the same
    way in test_eval_of_final_weights_reproduces_training_metrics.)"""
    family = "retinanet"
    cfg = tiny_config(family, train={"base_iters": 2, "checkpoint_period": 2})
    result = train(cfg)
    assert load_file(result.weights)["category_ids"] == [10, 20, 30]  # the synthetic classes' ids
    missing = {"annotations": str(tmp_path / "gone/instances_train.json"), "images": str(tmp_path / "gone/train")}
    eval_cfg = tiny_config(family, train={"base_iters": 2, "checkpoint_period": 2}, data={"train": missing})
    assert evaluate(eval_cfg, result.weights) == result.metrics
    assert evaluate(eval_cfg, result.output_dir / "checkpoint_0000002.pth") == result.metrics


@pytest.fixture
def finished_run(tiny_config):
    """A finished 1-iteration RetinaNet run and its config."""
    cfg = tiny_config(train={"base_iters": 1})
    return cfg, train(cfg)


def test_eval_refuses_a_val_split_with_other_categories(finished_run, synth_root: Path, tiny_config,
                                                        tmp_path: Path) -> None:
    """One error, naming the val split's categories and the ones the weights were trained on."""
    cfg, result = finished_run
    dataset = json.loads((synth_root / "annotations/instances_val.json").read_text())
    renumber = {10: 10, 20: 20, 30: 35}
    dataset["categories"] = [{**c, "id": renumber[c["id"]]} for c in dataset["categories"]]
    dataset["annotations"] = [{**a, "category_id": renumber[a["category_id"]]} for a in dataset["annotations"]]
    other = tmp_path / "instances_val_other.json"
    other.write_text(json.dumps(dataset))
    eval_cfg = tiny_config(train={"base_iters": 1}, data={"val": {"annotations": str(other),
                                                                  "images": str(synth_root / "val")}})
    names = [c["name"] for c in sorted(dataset["categories"], key=lambda c: c["id"])]
    with pytest.raises(UserError) as caught:
        evaluate(eval_cfg, result.weights)
    message = str(caught.value)
    assert message.count("error:") == 1, message
    assert (f"data.val's categories differ from the ones {result.weights} was trained on: data.val has "
            f"[10 {names[0]!r}, 20 {names[1]!r}, 35 {names[2]!r}], {result.weights} "
            f"[10 {names[0]!r}, 20 {names[1]!r}, 30 {names[2]!r}]") in message


def test_eval_of_weights_without_category_ids_reads_the_training_split(finished_run, tiny_config,
                                                                      tmp_path: Path) -> None:
    """Files written before category ids were recorded: eval takes the categories from data.train, as before."""
    cfg, result = finished_run
    state = load_file(result.weights)
    del state["category_ids"]
    old = tmp_path / "old_model_final.pth"
    save_file(state, old)
    assert evaluate(cfg, old) == result.metrics
    missing = str(tmp_path / "gone/instances_train.json")
    eval_cfg = tiny_config(train={"base_iters": 1}, data={"train": {"annotations": missing,
                                                                    "images": str(tmp_path / "gone")}})
    with pytest.raises(UserError, match="instances_train.json"):
        evaluate(eval_cfg, old)


def _voc(root: Path, images: dict[str, list[tuple[str, int, tuple]]]) -> Path:
    """A VOC year folder with splits train (stems t*) and val (stems v*)."""
    for stem, objects in images.items():
        write_image(root / "JPEGImages" / f"{stem}.jpg", 40, 30)
        (root / "Annotations").mkdir(parents=True, exist_ok=True)
        (root / "Annotations" / f"{stem}.xml").write_text(voc_xml(stem, 40, 30, objects))
    (root / "ImageSets/Main").mkdir(parents=True, exist_ok=True)
    for split in ("train", "val"):
        (root / "ImageSets/Main" / f"{split}.txt").write_text("".join(f"{s}\n" for s in images if s[0] == split[0]))
    return root


@pytest.mark.parametrize("fmt", ["coco", "voc"])
def test_the_val_split_alone_is_checked_and_built_as_with_the_training_split(fmt: str, tiny_config,
                                                                            tmp_path: Path) -> None:
    """build_val_dataset, given the training categories, gives the val dataset build_datasets gives (a VOC val
    split with fewer classes still takes the training ids by name), and the same errors."""
    data = {}
    if fmt == "voc":
        root = _voc(tmp_path / "VOC", {"t1": [("cat", 0, (1, 1, 10, 10)), ("horse", 0, (5, 5, 30, 20))],
                                       "t2": [("dog", 0, (2, 2, 20, 20))],
                                       "v1": [("dog", 0, (3, 3, 12, 12)), ("horse", 1, (1, 1, 40, 30))]})
        data = {"train": {"format": "voc", "root": str(root), "split": "train"},
                "val": {"format": "voc", "root": str(root), "split": "val"}}
    cfg = tiny_config(data=data)
    train_set, val_set = build_datasets(cfg, with_masks=False)
    alone = build_val_dataset(cfg, train_set.class_names, train_set.label_to_category[1:], trained="the model")
    def names(dataset: dict) -> list[tuple[int, str]]:  # a weights file records ids and names, no supercategory
        return [(c["id"], c["name"]) for c in dataset["categories"]]

    assert {**alone.coco.dataset, "categories": None} == {**val_set.coco.dataset, "categories": None}
    assert names(alone.coco.dataset) == names(val_set.coco.dataset)
    assert alone.label_to_category == val_set.label_to_category == train_set.label_to_category
    if fmt == "voc":
        assert train_set.class_names == ["cat", "dog", "horse"]
        (root / "Annotations/v1.xml").write_text(voc_xml("v1", 40, 30, [("zebra", 0, (3, 3, 12, 12))]))
        problem = "v1.xml: image 1: object 1: class 'zebra' is not in the class list ['cat', 'dog', 'horse']"
        for build in (lambda: build_datasets(cfg, with_masks=False),
                      lambda: build_val_dataset(cfg, train_set.class_names, train_set.label_to_category[1:])):
            with pytest.raises(UserError) as caught:
                build()
            assert [line for line in str(caught.value).splitlines() if "error:" in line] == [
                f"  error: {root / 'Annotations' / problem}"]


def test_bias_lr_factor_and_weight_decay_make_a_bias_group(tiny_config) -> None:
    """The authors' recipe (bias LR x2, no bias decay) as a second parameter group; the default keeps one group,
    and the LR schedule scales both groups alike."""
    cfg = tiny_config(train={"bias_lr_factor": 2.0, "bias_weight_decay": 0.0, "warmup_iters": 2})
    model = build_detector(cfg.model, 3)
    optimizer = runner.build_optimizer(cfg, model)
    plain, biases = optimizer.param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(names[id(p)].endswith(".bias") for p in biases["params"])
    assert not any(names[id(p)].endswith(".bias") for p in plain["params"])
    assert len(plain["params"]) + len(biases["params"]) == sum(p.requires_grad for p in model.parameters())
    assert biases["weight_decay"] == 0.0 and plain["weight_decay"] == cfg.train.weight_decay
    scheduler = runner.build_lr_scheduler(cfg, optimizer)
    for _ in range(3):
        assert biases["lr"] == pytest.approx(2 * plain["lr"])
        optimizer.step()
        scheduler.step()
    default = runner.build_optimizer(tiny_config(), model)
    assert len(default.param_groups) == 1


def test_adamw_takes_the_scaled_lr_weight_decay_and_bias_group(tiny_config) -> None:
    """train.optimizer=adamw builds torch's AdamW with the same LR scaling, decay and bias group as SGD."""
    cfg = tiny_config(train={"optimizer": "adamw", "base_lr": 0.004, "reference_batch_size": 16, "batch_size": 4,
                             "weight_decay": 0.05, "bias_weight_decay": 0.0})
    model = build_detector(cfg.model, 3)
    optimizer = runner.build_optimizer(cfg, model)
    assert type(optimizer) is torch.optim.AdamW
    plain, biases = optimizer.param_groups
    assert plain["lr"] == biases["lr"] == pytest.approx(0.001)
    assert (plain["weight_decay"], biases["weight_decay"]) == (0.05, 0.0)
    assert type(runner.build_optimizer(tiny_config(), model)) is torch.optim.SGD


def test_ema_decay_saves_and_evaluates_the_average_of_every_iterations_weights(tiny_config) -> None:
    """With train.ema_decay the final weights are e_1 = w_1, e_k = d e_(k-1) + (1 - d) w_k over the weights after
    every iteration (parameters and float buffers), not the last weights; the last checkpoint's detector is them too."""
    decay = 0.6
    cfg = tiny_config("fcos", train={"base_iters": 4, "checkpoint_period": 1, "ema_decay": decay})
    result = train(cfg)
    steps = [load_file(result.output_dir / f"checkpoint_{k:07d}.pth")["model"] for k in range(1, 5)]
    final = load_file(result.weights)["model"]
    raw_last = {k[len("detector."):]: v for k, v in steps[-1].items() if k.startswith("detector.")}
    floats = [k for k, v in final.items() if v.is_floating_point()]
    expected = {k: steps[0][f"detector.{k}"].clone() for k in floats}
    for state in steps[1:]:
        for k in floats:
            expected[k] = decay * expected[k] + (1 - decay) * state[f"detector.{k}"]
    for k in floats:
        torch.testing.assert_close(final[k], expected[k], rtol=1e-5, atol=1e-6, msg=k)
    assert any(not torch.equal(final[k], raw_last[k]) for k in floats), "the final weights are the last ones"
    from_checkpoint, _ = read_detector_weights(result.output_dir / "checkpoint_0000004.pth", cfg,
                                               load_file(result.weights)["class_names"], ())
    assert [k for k in final if not torch.equal(final[k], from_checkpoint[k])] == []


def test_resume_restores_the_weight_average(tiny_config, tmp_path) -> None:
    """A run with train.ema_decay resumed from its iteration-2 checkpoint ends on the uninterrupted run's weights."""
    cfg = tiny_config(train={"base_iters": 4, "checkpoint_period": 2, "ema_decay": 0.5})
    uninterrupted = load_file(train(cfg).weights)["model"]
    for name in (FINAL_WEIGHTS, "checkpoint_0000004.pth", SUMMARY):
        (Path(cfg.output_dir) / name).unlink()
    (Path(cfg.output_dir) / "last_checkpoint").write_text("checkpoint_0000002.pth")
    resumed = load_file(train(cfg, resume=True).weights)["model"]
    assert [k for k in uninterrupted if not torch.equal(uninterrupted[k], resumed[k])] == []


@pytest.mark.parametrize("amp, device, min_size, warned", [
    ("bf16", "cpu", 64, True), ("bf16", "cpu", 128, False), ("off", "cpu", 64, False), ("bf16", "cuda", 64, False),
])
def test_cpu_bf16_at_small_sizes_is_warned_of(tiny_config, caplog: pytest.LogCaptureFixture, amp: str, device: str,
                                               min_size: int, warned: bool) -> None:
    """bf16 on the CPU where an image may be 64 px wide or less (torch's CPU bf16 conv gives wrong weight gradients
    for the P7 conv's one-pixel-wide input there) is a warning naming the setting; other settings are quiet."""
    cfg = tiny_config(train={"amp": amp}, model={"min_size": min_size, "max_size": max(min_size, 64)})
    with caplog.at_level("WARNING", logger="labelenc.runner"):
        runner.warn_of_cpu_bf16_convolutions(cfg, torch.device(device))
    assert ("train.amp=bf16 on the CPU with model.min_size=64" in caplog.text) == warned
    assert bool(caplog.records) == warned
