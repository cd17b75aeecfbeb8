"""Mixed precision in the training loop: bf16 autocast (CPU here, as on CUDA), fp16 with a gradient scaler whose
overflowing steps are skipped like non-finite ones and whose state survives a resume; the LabelEnc parts under AMP."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from labelenc.engine.checkpoint import Checkpointer
from labelenc.engine.hooks import LRScheduler, PeriodicCheckpoint
from labelenc.engine.trainer import Hook, Trainer, build_grad_scaler
from labelenc.method import LabelEncoderTarget, label_maps_of, loss_feature_distance
from labelenc.models import build_detector
from labelenc.runner import train
from labelenc.stages import STAGES

CPU = torch.device("cpu")


class ConvToy(nn.Module):
    """A convolution (autocast runs it in 16 bits) and a float32 loss; ``scale`` multiplies the loss."""

    def __init__(self, scale: float = 1.0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.scale = scale
        self.dtypes: list[torch.dtype] = []

    def forward(self, images: list[Tensor], targets: list[dict]) -> dict[str, Tensor]:
        out = self.conv(torch.stack(images))
        self.dtypes.append(out.dtype)
        return {"loss_fit": self.scale * (out.float() - 1).pow(2).mean()}


def batches() -> Iterator:
    i = 0
    while True:
        g = torch.Generator().manual_seed(i)
        yield [torch.randn(3, 8, 8, generator=g) for _ in range(2)], [{}, {}]
        i += 1


def weights(model: nn.Module) -> list[Tensor]:
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("amp, dtype", [("off", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_autocast_dtype_follows_train_amp(amp: str, dtype: torch.dtype) -> None:
    model = ConvToy()
    before = weights(model)
    Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), batches(), 2, CPU, amp=amp).train()
    assert model.dtypes == [dtype, dtype]
    assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights stay float32
    assert any(not torch.equal(a, b) for a, b in zip(before, weights(model)))


class Seen(Hook):
    def __init__(self) -> None:
        self.steps: list[tuple[list[Tensor], float, float]] = []

    def after_step(self, trainer: Trainer) -> None:
        self.steps.append((weights(trainer.model), trainer.metrics["skipped"], trainer.scaler.get_scale()))


def test_fp16_overflow_skips_the_step_lowers_the_scale_and_does_not_stop_the_run() -> None:
    """A loss scale too large for fp16 gradients: the step is skipped (weights untouched), the scale halves, and
    training goes on; overflows are not counted as divergence (max_bad_steps=1 would otherwise stop it)."""
    model = ConvToy()
    before = weights(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40)
    seen = Seen()
    Trainer(model, optimizer, batches(), 40, CPU, [seen], amp="fp16", max_bad_steps=1, scaler=scaler).train()
    first_weights, first_skipped, first_scale = seen.steps[0]
    assert first_skipped == 1.0 and first_scale == 2.0**39
    assert all(torch.equal(a, b) for a, b in zip(before, first_weights))
    assert seen.steps[-1][1] == 0.0  # the scale came down until the steps went through
    assert any(not torch.equal(a, b) for a, b in zip(before, seen.steps[-1][0]))


@pytest.mark.filterwarnings("error")
def test_skipped_fp16_iterations_count_in_the_lr_schedule_without_a_warning() -> None:
    """The schedule counts iterations, skipped ones too (as detectron2's): after overflowing first iterations torch
    warns that the scheduler stepped before the optimizer, which is intended here and not shown."""
    model = ConvToy()
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: 0.5**i)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40)
    seen = Seen()
    Trainer(model, optimizer, batches(), 4, CPU, [LRScheduler(scheduler), seen], amp="fp16", scaler=scaler).train()
    assert [skipped for _, skipped, _ in seen.steps] == [1.0] * 4  # 2**40 takes more than 4 halvings to fit
    assert optimizer.param_groups[0]["lr"] == 0.5**4


def test_fp16_scaler_state_is_checkpointed_and_resume_is_exact(tmp_path: Path) -> None:
    def build() -> tuple[ConvToy, Trainer, Checkpointer]:
        torch.manual_seed(0)
        model = ConvToy(scale=1e3)
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: 1.0)
        scaler = build_grad_scaler("fp16", CPU)
        checkpointer = Checkpointer(model, optimizer, scheduler, tmp_path, {}, scaler=scaler)
        hooks = [LRScheduler(scheduler), PeriodicCheckpoint(checkpointer, 3)]
        return model, Trainer(model, optimizer, batches(), 6, CPU, hooks, amp="fp16", scaler=scaler), checkpointer

    model, trainer, _ = build()
    trainer.train()
    uninterrupted, scale = weights(model), trainer.scaler.get_scale()
    (tmp_path / "last_checkpoint").write_text("checkpoint_0000003.pth")

    model, trainer, checkpointer = build()
    start = checkpointer.resume()
    assert start == 3
    data = batches()
    for _ in range(3):  # the batches of iterations 0-2 were consumed before the checkpoint
        next(data)
    trainer.data = data
    trainer.train(start)
    assert trainer.scaler.get_scale() == scale
    assert all(torch.equal(a, b) for a, b in zip(uninterrupted, weights(model)))


def test_label_encoder_parts_under_bf16(tiny_config) -> None:
    """Under autocast the label maps are made in bf16 and h runs in bf16, while L_dis is computed in float32."""
    cfg = tiny_config(train={"amp": "bf16"})
    names = ["a", "b", "c"]
    step1 = STAGES["step1"].build(cfg, build_detector(cfg.model, 3), names, {})
    target = LabelEncoderTarget(step1.model.encoder)
    detector = step1.model.detector
    images = [torch.rand(3, 64, 64) for _ in range(2)]
    targets = [{"boxes": torch.tensor([[4.0, 4.0, 30.0, 40.0]]), "labels": torch.tensor([2])} for _ in range(2)]
    image_list, resized = detector.transform(images, targets)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        maps, _ = label_maps_of(image_list, resized, 3, False, False)
        encoded = target(image_list, resized)
        distance = loss_feature_distance(encoded, encoded)
    assert maps.dtype == torch.bfloat16
    assert all(x.dtype == torch.bfloat16 for x in encoded.values())
    assert distance.dtype == torch.float32 and distance.item() == 0.0


@pytest.mark.parametrize("stage", ["step1", "step2"])
def test_a_bf16_run_of_each_step_trains_on_the_cpu(tiny_config, tmp_path: Path, stage: str) -> None:
    step1 = train(tiny_config(train={"amp": "bf16", "base_iters": 2}, output_dir=str(tmp_path / "s1")), "step1")
    if stage == "step2":
        cfg = tiny_config(train={"amp": "bf16", "base_iters": 2}, model={"channels_last": True},
                          output_dir=str(tmp_path / "s2"))
        result = train(cfg, "step2", {"label_encoder": str(step1.outputs["label_encoder"])})
    else:
        result = step1
    records = (result.output_dir / "metrics.jsonl").read_text().splitlines()
    assert len(records) >= 2 and '"skipped": 0.0' in records[-1]
    assert result.metrics["bbox"]["AP"] is not None
