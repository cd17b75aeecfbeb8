"""Training recipes, one registry entry per kind of run: the baseline, LabelEnc Step 1 and Step 2.

A :class:`Stage` says how to wrap the detector (the objective module that returns the weighted loss dict), its
loss-weight schedules (Step-1 warm-up, Step-2 cut-off), its length and LR offset, the files it needs (``inputs``)
and writes besides the detector (``outputs``), and where it sits in the pipeline's comparison. The runner, the CLI
and the pipeline read everything from :data:`STAGES`: a new stage is one new ``register_stage(...)`` here.

Step 2 pulls the detector's features towards a frozen *feature target*; :data:`TARGETS` lists them by the input
file that provides one (the label encoder of Step 1 is the paper's).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from labelenc.artifact import (
    build_label_encoder,
    check_compatible,
    encoder_from_artifact,
    encoder_metadata,
    init_detector_from_artifact,
    load_label_encoder,
    save_label_encoder,
)
from labelenc.config import Config
from labelenc.engine.schedule import weight_on_between
from labelenc.errors import UserError
from labelenc.method import Baseline, LabelEncoderTarget, Step1, Step2
from labelenc.models import FAMILIES

LABEL_ENCODER = "label_encoder.pth"
Schedule = Callable[[int], float]


@dataclass(frozen=True)
class RunInput:
    """A file a stage reads: ``name`` is its key in ``inputs`` and, as ``--name-with-dashes``, its CLI option."""

    name: str
    help: str

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


@dataclass
class Objective:
    """What one run trains: the module around the detector, its loss-weight schedules and its length."""

    model: nn.Module
    max_iter: int
    weight_schedules: dict[str, Schedule] = field(default_factory=dict)
    lr_offset: int = 0  # iterations before the 1x/2x schedule starts (Step-1 warm-up): the LR decays move back by it
    save_outputs: Callable[[Path, dict], dict[str, Path]] | None = None  # (run dir, config) -> files written


BuildObjective = Callable[[Config, nn.Module, list[str], Mapping[str, str]], Objective]


@dataclass(frozen=True)
class Stage:
    """One kind of run, as the runner, the CLI and the pipeline see it."""

    name: str
    command: str  # the CLI subcommand
    help: str
    build: BuildObjective  # (config, fresh detector, class names, input files) -> Objective
    inputs: tuple[RunInput, ...] = ()
    one_input_of: bool = False  # True: exactly one of ``inputs`` is given; False: all are required
    outputs: Mapping[str, str] = field(default_factory=dict)  # input name -> file written besides the detector
    find_unused_parameters: bool = True  # for DDP: a loss term switched off by its schedule leaves parameters idle
    baseline: bool = False  # ``pipeline --skip-baselines`` leaves it out
    pipeline_rows: tuple[tuple[str, str, str], ...] = ()  # (report row, run directory, schedule)

    def check_inputs(self, inputs: Mapping[str, str]) -> None:
        """Refuse missing (or, for ``one_input_of``, several) input files before anything is built."""
        given = [i for i in self.inputs if inputs.get(i.name)]
        if self.one_input_of and len(given) != 1 and self.inputs:
            options = " or ".join(f"{i.flag} FILE ({i.help})" for i in self.inputs)
            raise UserError(f"{self.name} needs exactly one of {options}")
        missing = [] if self.one_input_of else [i for i in self.inputs if i not in given]
        if missing:
            raise UserError(f"{self.name} needs " + ", ".join(f"{i.flag} FILE ({i.help})" for i in missing))


STAGES: dict[str, Stage] = {}


def register_stage(stage: Stage) -> Stage:
    """Add a stage to :data:`STAGES` (the pipeline runs them in registration order)."""
    STAGES[stage.name] = stage
    return stage


def _encoder_meta(cfg: Config, class_names: list[str]) -> dict:
    return encoder_metadata(cfg.model.family, class_names, cfg.model.fpn_channels, cfg.labelenc.encoder_width,
                            cfg.model.backbone)


# ------------------------------------------------------------------------------------------------ feature targets


@dataclass(frozen=True)
class FeatureTarget:
    """A Step-2 target provided by one input file: ``build`` loads it (and may initialise the detector from it)."""

    input: RunInput
    build: Callable[[Config, nn.Module, list[str], str], nn.Module]  # (config, detector, class names, file)


def _label_encoder_target(cfg: Config, detector: nn.Module, class_names: list[str], path: str) -> nn.Module:
    """The paper's Step 2: head (and matching FPN layers) from Step 1, target h(y) from the frozen h."""
    artifact = load_label_encoder(path)
    check_compatible(artifact["meta"], _encoder_meta(cfg, class_names), path)
    init_detector_from_artifact(detector, artifact)
    return LabelEncoderTarget(encoder_from_artifact(artifact), FAMILIES[cfg.model.family].with_masks)


TARGETS: dict[str, FeatureTarget] = {
    "label_encoder": FeatureTarget(RunInput("label_encoder", f"{LABEL_ENCODER} written by step1"),
                                   _label_encoder_target),
}


# ------------------------------------------------------------------------------------------------ stages


def _baseline(cfg: Config, detector: nn.Module, class_names: list[str], inputs: Mapping[str, str]) -> Objective:
    return Objective(Baseline(detector), cfg.train.max_iters)


def _step1(cfg: Config, detector: nn.Module, class_names: list[str], inputs: Mapping[str, str]) -> Objective:
    """Eq. 9 after a warm-up without L3 (paper: 30k iterations) that moves the LR decays back by as much."""
    method, total = cfg.labelenc, cfg.train.max_iters
    warmup = round(method.step1_warmup * cfg.train.base_iters)
    meta = _encoder_meta(cfg, class_names)
    model = Step1(detector, build_label_encoder(meta), method.reconstruction_weight, method.detection_weight,
                  method.distance_weight, method.box_jitter)

    def save(output_dir: Path, config: dict) -> dict[str, Path]:
        save_label_encoder(output_dir / LABEL_ENCODER, model.encoder, detector, meta, config)
        return {"label_encoder": output_dir / LABEL_ENCODER}  # as the stage's ``outputs`` declare

    distance = weight_on_between(warmup, warmup + total, method.distance_weight)
    return Objective(model, warmup + total, {"distance": distance}, lr_offset=warmup, save_outputs=save)


def _step2(cfg: Config, detector: nn.Module, class_names: list[str], inputs: Mapping[str, str]) -> Objective:
    """Eq. 7 towards the given target, with the distance loss off for the last ``distance_cutoff`` of the run."""
    method, total = cfg.labelenc, cfg.train.max_iters
    name = next(name for name in TARGETS if inputs.get(name))
    target = TARGETS[name].build(cfg, detector, class_names, inputs[name])
    cutoff = total - round(method.distance_cutoff * total)
    model = Step2(detector, target, method.distance_weight)
    return Objective(model, total, {"distance": weight_on_between(0, cutoff, method.distance_weight)})


register_stage(Stage(
    "baseline", "train", "train a plain detector (the baseline) and evaluate it", _baseline,
    find_unused_parameters=False, baseline=True,
    pipeline_rows=(("baseline 1x", "baseline_1x", "1x"), ("baseline 2x", "baseline_2x", "2x")),
))
register_stage(Stage(
    "step1", "step1", f"LabelEnc Step 1: learn the label encoder; writes {LABEL_ENCODER}", _step1,
    outputs={"label_encoder": LABEL_ENCODER}, pipeline_rows=(("step1-only", "step1", "1x"),),
))
register_stage(Stage(
    "step2", "step2", "LabelEnc Step 2: train a detector supervised by a frozen label encoder", _step2,
    inputs=tuple(t.input for t in TARGETS.values()), one_input_of=True,
    pipeline_rows=(("LabelEnc", "step2", "1x"),),
))
