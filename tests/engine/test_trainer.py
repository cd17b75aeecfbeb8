"""Tests for the training loop, its hooks and checkpoints (labelenc/engine/trainer.py) and labelenc.runner.train."""

from __future__ import annotations

import copy
import json
import math
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from conftest import image_first_read_at, tiny_raw, truncate_image
from torch import Tensor, nn

from labelenc.artifact import build_label_encoder, encoder_metadata
from labelenc.config import Config, build_config
from labelenc.data.loader import build_datasets, build_train_loader
from labelenc.engine.checkpoint import Checkpointer, load_file
from labelenc.engine.hooks import LossWeights, LRScheduler, PeriodicCheckpoint
from labelenc.engine.schedule import WarmupMultiStep, weight_on_between
from labelenc.engine.trainer import BatchError, Hook, NonFiniteLossError, Trainer
from labelenc.method import Step1
from labelenc.models import build_detector
from labelenc.runner import SUMMARY, RunDirError, RunResult, train

CPU = torch.device("cpu")


# --------------------------------------------------------------------------------------------------------------------
# A toy model with the trainer's interface, for the loop itself


class Toy(nn.Module):
    """``forward(images, targets) -> loss dict``; ``noise`` draws from the global RNG (as RPN/ROI sampling does)."""

    def __init__(self, noise: float = 0.0, bad_loss: float | None = None, bad_from: int = 0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.tensor([1.0, -2.0, 3.0]))
        self.bias = nn.Parameter(torch.tensor(0.5))
        self.noise, self.bad_loss, self.bad_from = noise, bad_loss, bad_from
        self.calls = 0

    def forward(self, images: list[Tensor], targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        x = torch.stack(images)
        y = torch.stack([t["y"] for t in targets])
        pred = x @ self.weight + self.bias
        if self.noise:
            pred = pred + self.noise * torch.randn_like(pred)
        losses = {"loss_fit": ((pred - y) ** 2).mean(), "loss_l2": 0.1 * self.weight.pow(2).sum()}
        if self.bad_loss is not None and self.calls >= self.bad_from:
            losses["loss_bad"] = self.bias * 0 + self.bad_loss
        self.calls += 1
        return losses


def toy_batches(start: int = 0) -> Iterator[tuple[list[Tensor], list[dict[str, Tensor]]]]:
    """Batch ``i`` of an endless stream is a function of ``i`` alone (the global RNG is not touched)."""
    i = start
    while True:
        g = torch.Generator().manual_seed(i)
        images = [torch.randn(3, generator=g) for _ in range(2)]
        targets = [{"y": torch.randn((), generator=g)} for _ in range(2)]
        yield images, targets
        i += 1


def params_of(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def all_equal(a: dict[str, Tensor], b: dict[str, Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class Record(Hook):
    """Calls ``fn(trainer)`` after every step and keeps the results."""

    def __init__(self, fn: Callable[[Trainer], object]) -> None:
        self.fn, self.seen = fn, []

    def after_step(self, trainer: Trainer) -> None:
        self.seen.append(self.fn(trainer))


@pytest.mark.parametrize("clip", [0.5, 1e6], ids=["clipping", "norm_below_limit"])
def test_grad_clip_limits_the_global_gradient_norm(clip: float) -> None:
    """With grad_clip the SGD update is the unclipped one scaled to norm ``clip`` (unchanged below the limit)."""
    updates, logged = {}, {}
    for name, limit in [("free", None), ("clipped", clip)]:
        model = Toy()
        before = params_of(model)
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
        trainer = Trainer(model, optimizer, toy_batches(), 1, CPU, grad_clip=limit)
        trainer.train()
        after = params_of(model)
        updates[name] = torch.cat([(after[k] - before[k]).flatten() for k in before])
        logged[name] = trainer.metrics["grad_norm"]
    free_norm = updates["free"].norm()
    assert free_norm > 4 * 0.5  # the first case really has to clip
    # the logged norm is the gradient's before clipping (SGD, lr 1: the free update is minus the gradient)
    assert logged["free"] == pytest.approx(free_norm.item(), rel=1e-5) == logged["clipped"]
    if clip < free_norm:
        assert updates["clipped"].norm() == pytest.approx(clip, rel=1e-4)
        torch.testing.assert_close(updates["clipped"], updates["free"] * clip / free_norm, rtol=1e-4, atol=1e-7)
    else:
        assert torch.equal(updates["clipped"], updates["free"])


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_losses_are_skipped_then_stop_the_run(bad: float) -> None:
    """Non-finite steps leave weights and momentum untouched; max_bad_steps in a row raise, naming the term."""
    model = Toy(bad_loss=bad, bad_from=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    snapshots = Record(lambda t: (params_of(t.model), copy.deepcopy(t.optimizer.state_dict())))
    trainer = Trainer(model, optimizer, toy_batches(), 10, CPU, hooks=[snapshots], grad_clip=1.0, max_bad_steps=3)
    with pytest.raises(NonFiniteLossError, match="loss_bad") as info:
        trainer.train()
    assert isinstance(info.value, FloatingPointError)
    assert "iteration 3" in str(info.value) and f"loss_bad={bad}" in str(info.value)
    assert len(snapshots.seen) == 3  # the good step 0 and the skipped steps 1, 2 finished
    params, opt_state = snapshots.seen[0]
    for later, _ in snapshots.seen[1:] + [(params_of(model), None)]:
        assert all_equal(later, params)
    buffers = [s["momentum_buffer"] for s in optimizer.state_dict()["state"].values()]
    assert all(torch.equal(b, s["momentum_buffer"]) for b, s in zip(buffers, opt_state["state"].values()))


class InfiniteGradientToy(Toy):
    """A finite loss whose gradient is not finite (sqrt at 0) from the second call on."""

    def forward(self, images: list[Tensor], targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        calls = self.calls
        losses = super().forward(images, targets)
        if calls >= 1:
            losses["loss_sqrt"] = (self.bias - self.bias.detach()).sqrt()
        return losses


def test_a_non_finite_gradient_is_logged_and_skipped_with_clipping(caplog: pytest.LogCaptureFixture) -> None:
    """With grad_clip a finite loss with a non-finite gradient leaves the weights untouched and says why; the
    logged gradient norm shows it."""
    model = InfiniteGradientToy()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    seen = Record(lambda t: (params_of(t.model), t.metrics["skipped"], t.metrics["grad_norm"]))
    Trainer(model, optimizer, toy_batches(), 3, CPU, hooks=[seen], max_bad_steps=3, grad_clip=1e6).train()
    (first, skip0, norm0), (second, skip1, norm1), (third, skip2, _) = seen.seen
    assert (skip0, skip1, skip2) == (0.0, 1.0, 1.0) and norm0 > 0 and not math.isfinite(norm1)
    assert all(torch.isfinite(p).all() for p in third.values())
    assert all_equal(first, second) and all_equal(second, third)
    assert "non-finite gradient norm" in caplog.text


class FlakyToy(Toy):
    """A NaN loss at the listed calls only."""

    def __init__(self, bad_calls: set[int]) -> None:
        super().__init__()
        self.bad_calls = bad_calls

    def forward(self, images: list[Tensor], targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        calls = self.calls
        losses = super().forward(images, targets)
        if calls in self.bad_calls:
            losses["loss_fit"] = losses["loss_fit"] * float("nan")
        return losses


def test_isolated_non_finite_steps_are_skipped_and_training_goes_on() -> None:
    """Bad steps fewer than max_bad_steps in a row are skipped (weights unchanged) and the run finishes."""
    model = FlakyToy({1, 2, 4})
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    seen = Record(lambda t: (params_of(t.model), t.metrics["skipped"]))
    Trainer(model, optimizer, toy_batches(), 6, CPU, hooks=[seen], max_bad_steps=3).train()
    skipped = [flag for _, flag in seen.seen]
    assert skipped == [0.0, 1.0, 1.0, 0.0, 1.0, 0.0]
    params = [p for p, _ in seen.seen]
    assert all_equal(params[0], params[1]) and all_equal(params[1], params[2])
    assert not all_equal(params[2], params[3]) and all_equal(params[3], params[4])
    assert not all_equal(params[4], params[5])


def test_checkpointer_resume_restores_iteration_lr_optimizer_and_rng(tmp_path: Path) -> None:
    """Resuming from a checkpoint restores iteration, LR schedule, momentum and RNG: the same result as one run."""

    def build(seed: int) -> tuple[Toy, torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR, Checkpointer]:
        torch.manual_seed(seed)
        model = Toy(noise=0.3)
        with torch.no_grad():
            model.weight.add_(torch.randn(3))  # a fresh process would not start from the trained weights
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupMultiStep([3, 5], 2, 0.1))
        return model, optimizer, scheduler, Checkpointer(model, optimizer, scheduler, tmp_path, {"stage": "toy"})

    model, optimizer, scheduler, checkpointer = build(0)
    lrs = Record(lambda t: t.metrics["lr"])
    rng = Record(lambda t: torch.get_rng_state())
    hooks = [LRScheduler(scheduler), PeriodicCheckpoint(checkpointer, 2), lrs, rng]
    Trainer(model, optimizer, toy_batches(), 6, CPU, hooks).train()
    uninterrupted = params_of(model)
    assert sorted(p.name for p in tmp_path.glob("checkpoint_*.pth")) == [f"checkpoint_000000{i}.pth" for i in (2, 4, 6)]
    assert (tmp_path / "last_checkpoint").read_text() == "checkpoint_0000006.pth"
    saved = load_file(tmp_path / "checkpoint_0000004.pth")
    assert saved["iteration"] == 4 and saved["stage"] == "toy"

    def resume() -> Toy:
        (tmp_path / "last_checkpoint").write_text("checkpoint_0000004.pth")  # as if stopped after iteration 4
        model, optimizer, scheduler, checkpointer = build(1)
        start = checkpointer.resume()
        assert start == 4
        assert scheduler.last_epoch == 4
        assert optimizer.param_groups[0]["lr"] == pytest.approx(lrs.seen[4], rel=1e-12)
        state, saved_state = optimizer.state_dict()["state"], saved["optimizer"]["state"]
        assert state.keys() == saved_state.keys() and len(state) == 2
        assert all(torch.equal(state[k]["momentum_buffer"], saved_state[k]["momentum_buffer"]) for k in state)
        assert torch.equal(torch.get_rng_state(), rng.seen[3])
        resumed_lrs = Record(lambda t: t.metrics["lr"])
        Trainer(model, optimizer, toy_batches(start), 6, CPU, [LRScheduler(scheduler), resumed_lrs]).train(start)
        assert resumed_lrs.seen == lrs.seen[4:]
        return model

    assert all_equal(params_of(resume()), uninterrupted)

    # Control: the toy draws from the RNG, so a resume that did not restore it would not match.
    (tmp_path / "last_checkpoint").write_text("checkpoint_0000004.pth")
    model, optimizer, scheduler, checkpointer = build(1)
    start = checkpointer.resume()
    torch.manual_seed(12345)
    Trainer(model, optimizer, toy_batches(start), 6, CPU, [LRScheduler(scheduler)]).train(start)
    assert not all_equal(params_of(model), uninterrupted)


def test_periodic_checkpoint_keeps_only_the_newest(tmp_path: Path) -> None:
    """keep=2 leaves the two newest checkpoints (the pointer names the newest); older ones are deleted as it goes."""
    model = Toy(noise=0.0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    checkpointer = Checkpointer(model, optimizer, scheduler, tmp_path, {"stage": "toy"})
    (tmp_path / "checkpoint_0000001.pth.broken").write_bytes(b"set aside earlier")
    seen = Record(lambda t: sorted(p.name for p in tmp_path.glob("checkpoint_*.pth")))
    Trainer(model, optimizer, toy_batches(), 7, CPU, [PeriodicCheckpoint(checkpointer, 2, keep=2), seen]).train()
    assert seen.seen[3] == ["checkpoint_0000002.pth", "checkpoint_0000004.pth"]
    assert seen.seen[5] == ["checkpoint_0000004.pth", "checkpoint_0000006.pth"]
    assert seen.seen[-1] == ["checkpoint_0000006.pth", "checkpoint_0000007.pth"]
    assert (tmp_path / "last_checkpoint").read_text() == "checkpoint_0000007.pth"
    assert (tmp_path / "checkpoint_0000001.pth.broken").exists()  # only periodic checkpoints are counted


def test_loss_weights_hook_keeps_the_adaption_net_frozen_during_step1_warmup(tiny_config) -> None:
    """With L3's weight 0 in the warm-up, feature_distance is not computed and the adaption net is not updated."""
    cfg = tiny_config(train={"batch_size": 1})
    torch.manual_seed(0)
    train_set, _ = build_datasets(cfg, with_masks=False)
    detector = build_detector(cfg.model, train_set.num_classes)
    meta = encoder_metadata("retinanet", train_set.class_names, cfg.model.fpn_channels, 0.0625, "resnet18")
    model = Step1(detector, build_label_encoder(meta))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9,
                                weight_decay=1e-2)
    initial_adaption = params_of(model.adaption)
    initial_head = params_of(model.detector.head)
    record = Record(lambda t: (params_of(t.model.adaption), params_of(t.model.detector.head), set(t.metrics),
                               t.model.loss_weights["distance"]))
    hooks = [LossWeights({"distance": weight_on_between(1, 10, 0.5)}), record]  # a warm-up of one iteration
    Trainer(model, optimizer, build_train_loader(train_set, cfg, 0), 2, CPU, hooks).train()

    (a0, h0, m0, w0), (a1, _, m1, w1) = record.seen
    assert (w0, w1) == (0.0, 0.5)
    assert all_equal(a0, initial_adaption)  # no gradient, so no weight decay or momentum step either
    assert not all_equal(a1, initial_adaption)  # L3 on from iteration 1
    assert not all_equal(h0, initial_head)  # the rest does train in the warm-up
    assert "feature_distance" not in m0 and "feature_distance" in m1
    assert {"reconstruction_classification", "classification"} <= m0


# --------------------------------------------------------------------------------------------------------------------
# Whole runs through labelenc.runner.train (tiny retinanet / Faster R-CNN on the synthetic set)

BASELINE = {"base_iters": 4, "batch_size": 1, "base_lr": 0.02, "reference_batch_size": 2}  # lr 0.02 * 1 / 2 = 0.01


def make_config(synth_root: Path, output_dir: Path, family: str = "retinanet", **sections: dict) -> Config:
    raw = tiny_raw(synth_root, output_dir, family)
    for section, values in sections.items():
        raw[section].update(values)
    return build_config(raw)


def read_metrics(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def untimed(record: dict) -> dict:
    """A metrics line without its wall-clock entries (time, data_time)."""
    return {k: v for k, v in record.items() if "time" not in k}


def final_state(result: RunResult) -> dict[str, Tensor]:
    return load_file(result.weights)["model"]


def copy_run(source: Path, target: Path, cfg: Config) -> Config:
    shutil.copytree(source, target)
    return cfg.model_copy(update={"output_dir": str(target)})


@pytest.fixture(scope="module")
def finished_run(
    synth_root: Path, tmp_path_factory: pytest.TempPathFactory
) -> Callable[[str], tuple[Config, RunResult]]:
    """``finished_run(family)``: one finished 4-iteration baseline run per family (shared; tests work on copies)."""
    runs: dict[str, tuple[Config, RunResult]] = {}

    def get(family: str) -> tuple[Config, RunResult]:
        if family not in runs:
            cfg = make_config(synth_root, tmp_path_factory.mktemp(f"baseline_{family}") / "run", family, train=BASELINE)
            runs[family] = (cfg, train(cfg, "baseline"))
        return runs[family]

    return get


@pytest.mark.parametrize("family", ["retinanet", "faster_rcnn"])
def test_resume_equals_an_uninterrupted_run(finished_run, tmp_path: Path, family: str) -> None:
    """A run stopped in iteration 4 and resumed from its iteration-2 checkpoint ends with exactly the same weights."""
    cfg, uninterrupted = finished_run(family)
    lines = read_metrics(uninterrupted.output_dir)
    assert [r["iteration"] for r in lines] == [1, 2, 3, 4]
    # lr 0.02 for batch 2 scaled to 0.01 for batch 1; warm-up 2 iterations; decays at 2/3 and 8/9 of 4 -> 3 and 4
    factors = WarmupMultiStep(cfg.train.decay_milestones(4), 2, cfg.train.warmup_factor)
    assert cfg.train.decay_milestones(4) == [3, 4]
    assert [r["lr"] for r in lines] == pytest.approx([0.01 * factors(i) for i in range(4)], rel=1e-9)

    out = tmp_path / "interrupted"
    resumed_cfg = copy_run(uninterrupted.output_dir, out, cfg)
    for name in ("model_final.pth", "model_final_eval.json", "run_summary.json", "checkpoint_0000004.pth"):
        (out / name).unlink()
    (out / "last_checkpoint").write_text("checkpoint_0000002.pth")
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines[:3]))  # died in iteration 4

    resumed = train(resumed_cfg, "baseline", resume=True)

    ours, theirs = final_state(resumed), final_state(uninterrupted)
    assert ours.keys() == theirs.keys()
    different = [k for k in ours if not torch.equal(ours[k], theirs[k])]
    assert different == []
    assert resumed.metrics == uninterrupted.metrics
    resumed_lines = read_metrics(out)
    assert [r["iteration"] for r in resumed_lines] == [1, 2, 3, 4]
    assert [untimed(r) for r in resumed_lines] == [untimed(r) for r in lines]
    assert (out / "last_checkpoint").read_text() == "checkpoint_0000004.pth"


def test_an_unreadable_image_mid_run_saves_the_state_before_it_and_resume_loses_nothing(
    finished_run, synth_root: Path, tmp_path: Path
) -> None:
    """An image that cannot be decoded at iteration 3 stops the run with its path and a checkpoint of iteration 3;
    once the file is fixed, --resume ends with the weights of a run that never failed."""
    _, uninterrupted = finished_run("retinanet")
    data = tmp_path / "data"
    shutil.copytree(synth_root, data)
    cfg = make_config(data, tmp_path / "run", train=BASELINE)
    image = image_first_read_at(cfg, 3)
    original = truncate_image(image)
    with pytest.raises(BatchError) as info:
        train(cfg, "baseline")
    message = str(info.value)
    assert f"cannot read image {image}" in message and "before iteration 3" in message
    assert f"saved in {tmp_path / 'run' / 'checkpoint_0000003.pth'}" in message and "--resume" in message
    assert load_file(tmp_path / "run" / "checkpoint_0000003.pth")["iteration"] == 3
    assert [r["iteration"] for r in read_metrics(tmp_path / "run")] == [1, 2, 3]

    image.write_bytes(original)
    resumed = train(cfg, "baseline", resume=True)
    ours, theirs = final_state(resumed), final_state(uninterrupted)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in theirs)
    lines = [untimed(r) for r in read_metrics(tmp_path / "run")]
    assert lines == [untimed(r) for r in read_metrics(uninterrupted.output_dir)]


@pytest.mark.parametrize("state", ["finished", "interrupted"])
def test_train_refuses_to_overwrite_a_run(finished_run, tmp_path: Path, state: str) -> None:
    """train() into a directory holding a run raises RunDirError and leaves the run untouched."""
    cfg, result = finished_run("retinanet")
    out = tmp_path / "run"
    cfg = copy_run(result.output_dir, out, cfg)
    if state == "interrupted":
        (out / "model_final.pth").unlink()
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    with pytest.raises(RunDirError, match="--resume") as info:
        train(cfg, "baseline")
    assert str(out) in str(info.value)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


def test_resume_of_a_finished_run_changes_nothing(finished_run, tmp_path: Path) -> None:
    """--resume on a finished run trains no further: same weights, same metrics lines, same checkpoints; its summary
    keeps where and how long the run trained (here: a run trained on another machine), not the re-evaluation's."""
    cfg, result = finished_run("retinanet")
    out = tmp_path / "run"
    cfg = copy_run(result.output_dir, out, cfg)
    checkpoints = {p.name: p.read_bytes() for p in out.glob("checkpoint_*.pth")}
    summary = json.loads((out / SUMMARY).read_text())
    gpu = "gpu-node (x86_64, 16 threads, CUDA H100)"
    summary.update(machine=gpu, wall_time=1234.5,
                   trained_on=[{"machine": gpu, "iterations": [0, summary["iterations"]], "wall_time": 1234.5}])
    (out / SUMMARY).write_text(json.dumps(summary))
    again = train(cfg, "baseline", resume=True)
    state, reference = final_state(again), final_state(result)
    assert all(torch.equal(state[k], reference[k]) for k in reference)
    assert (out / "metrics.jsonl").read_text() == (result.output_dir / "metrics.jsonl").read_text()
    assert {p.name: p.read_bytes() for p in out.glob("checkpoint_*.pth")} == checkpoints
    assert again.metrics == result.metrics
    rewritten = json.loads((out / SUMMARY).read_text())
    assert rewritten["machine"] == summary["machine"] and rewritten["wall_time"] == again.wall_time == 1234.5
    assert rewritten["trained_on"] == summary["trained_on"]
    assert rewritten["wall_time_this_process"] != summary["wall_time_this_process"]


def test_overwrite_replaces_a_run(finished_run, tmp_path: Path) -> None:
    """overwrite=True removes the old run and starts a fresh one in its place."""
    cfg, result = finished_run("retinanet")
    out = tmp_path / "run"
    copy_run(result.output_dir, out, cfg)
    shorter = cfg.model_copy(update={"output_dir": str(out), "train": cfg.train.model_copy(update={"base_iters": 1})})
    train(shorter, "baseline", overwrite=True)
    assert sorted(p.name for p in out.glob("checkpoint_*.pth")) == ["checkpoint_0000001.pth"]
    assert (out / "last_checkpoint").read_text() == "checkpoint_0000001.pth"
    assert [r["iteration"] for r in read_metrics(out)] == [1]


# Step 1 of base 2 with a warm-up of 1x: 2 warm-up iterations, then 2 with L3 (4 in all); batch 1 at lr 0.01.
STEP1 = {"train": {"base_iters": 2, "batch_size": 1, "reference_batch_size": 1}, "labelenc": {"step1_warmup": 1.0}}


@pytest.fixture(scope="module")
def step1_run(synth_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Config, RunResult]:
    """A finished tiny Step-1 run (retinanet) with its label encoder."""
    cfg = make_config(synth_root, tmp_path_factory.mktemp("step1") / "run", **STEP1)
    return cfg, train(cfg, "step1")


def test_step1_adds_the_distance_only_after_the_warmup(step1_run) -> None:
    """Step 1 logs feature_distance from iteration 3 on (after a 2-iteration warm-up); LR decays shift with it."""
    cfg, result = step1_run
    lines = read_metrics(result.output_dir)
    assert [r["iteration"] for r in lines] == [1, 2, 3, 4]
    assert [r["iteration"] for r in lines if "feature_distance" in r] == [3, 4]
    assert all("reconstruction_classification" in r and "classification" in r for r in lines)
    assert cfg.train.decay_milestones(2) == [1, 2]  # the 1x part alone; the warm-up shifts them by 2
    factors = WarmupMultiStep([2 + 1, 2 + 2], cfg.train.warmup_iters, cfg.train.warmup_factor)
    assert [r["lr"] for r in lines] == pytest.approx([0.01 * factors(i) for i in range(4)], rel=1e-9)
    assert result.outputs["label_encoder"].is_file()


def test_step2_cuts_the_distance_off_at_the_end(step1_run, synth_root: Path, tmp_path: Path) -> None:
    """Step 2 with distance_cutoff 1/3 of 3 iterations logs feature_distance in iterations 1-2 and not in 3."""
    _, step1 = step1_run
    cfg = make_config(synth_root, tmp_path / "step2", train={"base_iters": 3, "batch_size": 1},
                      labelenc={"distance_cutoff": 1 / 3})
    result = train(cfg, "step2", {"label_encoder": str(step1.outputs["label_encoder"])})
    lines = read_metrics(result.output_dir)
    assert [r["iteration"] for r in lines] == [1, 2, 3]
    assert [r["iteration"] for r in lines if "feature_distance" in r] == [1, 2]
