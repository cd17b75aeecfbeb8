"""Training recipes, one registry entry per kind of run: the baseline, LabelEnc Step 1 and Step 2.

A :class:`Stage` says how to wrap the detector (the objective module that returns the weighted loss dict), its
loss-weight schedules (Step-1 warm-up, Step-2 cut-off), its length and LR offset, the files it needs (``inputs``)
and writes besides the detector (``outputs``), and where it sits in the pipeline's comparison. The runner, the CLI
and the pipeline read everything from :data:`STAGES`: a new stage is one new ``register_stage(...)`` here.

Step 2 pulls the detector's features towards a frozen *feature target*; :data:`TARGETS` lists them by the input
file that provides one: the label encoder of Step 1 (the paper's) or a trained teacher detector (knowledge
distillation, the paper's Table 6). The ablation stages of Tables 2 and 5 are small variations of Step 1 and Step 2.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from torch import Tensor, nn

from labelenc.artifact import (
    build_label_encoder,
    check_compatible,
    encoder_from_artifact,
    encoder_metadata,
    init_detector_from_artifact,
    load_label_encoder,
    save_label_encoder,
)
from labelenc.config import Config, ModelConfig
from labelenc.engine.checkpoint import CheckpointError, load_file
from labelenc.engine.schedule import weight_on_between
from labelenc.errors import UserError
from labelenc.method import Baseline, LabelEncoderTarget, ReconstructionOnly, Step1, Step2, TeacherTarget
from labelenc.models import FAMILIES, build_detector

LABEL_ENCODER = "label_encoder.pth"
Schedule = Callable[[int], float]


@dataclass(frozen=True)
class RunInput:
    """A file a stage reads: ``name`` is its key in ``inputs`` and, as ``--name-with-dashes``, its CLI option.

    ``read(config, class names, file)`` returns what the file holds, refusing one that does not fit the run.
    """

    name: str
    help: str
    read: Callable[[Config, list[str], str], Any]

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
    trains_detector: bool = True  # False: no detector weights to save and evaluate (a Step 1 without image backbone)
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

    def check_input_files(self, cfg: Config, class_names: list[str], inputs: Mapping[str, str]) -> None:
        """Read each given input file as the build will, so that one that does not fit this run's detector or classes
        is refused before the run directory is written."""
        for run_input in self.inputs:
            if inputs.get(run_input.name):
                run_input.read(cfg, class_names, inputs[run_input.name])


STAGES: dict[str, Stage] = {}


def register_stage(stage: Stage) -> Stage:
    """Add a stage to :data:`STAGES` (the pipeline runs them in registration order)."""
    STAGES[stage.name] = stage
    return stage


def _encoder_meta(cfg: Config, class_names: list[str], image_backbone: bool = True) -> dict:
    """What h fits and how it is built; a Step 1 without an image backbone records none."""
    return encoder_metadata(cfg.model.family, class_names, cfg.model.fpn_channels, cfg.labelenc.encoder_width,
                            cfg.model.backbone if image_backbone else None, p6_from=cfg.model.p6_from,
                            head_norm=cfg.model.head_norm, h_init=cfg.labelenc.h_init)


# ------------------------------------------------------------------------------------------------ input files


def read_detector_weights(
    path: str | Path, cfg: Config, class_names: list[str], keys: tuple[str, ...], what: str = "weights"
) -> tuple[dict[str, Tensor], dict]:
    """The detector state dict of a ``model_final.pth`` or ``checkpoint_*.pth`` (the weight average, when the run
    kept one: what its ``model_final.pth`` holds), and the model config it records.

    Anything else (a label encoder, a run that trains no detector, a foreign file) is refused, and so is a file whose
    model config differs from ``cfg`` in ``keys`` or whose classes differ from ``class_names``: one error naming the
    file and each difference (``what`` names the file's side).
    """
    state = load_file(path, kind=what)
    if state.get("kind") == "label_encoder":
        raise CheckpointError(f"{path} is a label-encoder file (h and the head, written by step1), not detector "
                              "weights: use model_final.pth or a checkpoint_*.pth of a run")
    stage = STAGES.get(state.get("stage"))
    if not isinstance(state.get("model"), dict) or (stage is not None and not stage.trains_detector):
        raise CheckpointError(f"{path} holds no detector weights: expected model_final.pth or a checkpoint_*.pth of a "
                              "run that trains a detector")
    trained = state.get("config", {}).get("model", {})
    differs = [f"{k}: {what} {trained[k]!r}, config {getattr(cfg.model, k)!r}" for k in keys
               if k in trained and trained[k] != getattr(cfg.model, k)]
    if "class_names" in state and state["class_names"] != class_names:
        differs.append(f"classes: {what} {state['class_names']}, data {class_names}")
    if differs:
        raise UserError(f"{path} does not fit the detector of this config: " + "; ".join(differs))
    if "weight_average" in state:  # a checkpoint of a run with train.ema_decay: its detector is the average
        model_state = {k[len("module."):]: v for k, v in state["weight_average"].items() if k.startswith("module.")}
    elif state.get("kind") != "detector":  # a training checkpoint: keep the detector's part
        model_state = {k[len("detector."):]: v for k, v in state["model"].items() if k.startswith("detector.")}
    else:
        model_state = state["model"]
    return model_state, trained


def load_strictly(detector: nn.Module, state: dict[str, Tensor], path: str | Path) -> None:
    """Load ``state`` into ``detector`` with every key and shape matching; a mismatch is an error naming ``path``."""
    try:
        detector.load_state_dict(state, strict=True)
    except RuntimeError as err:
        reason = str(err).splitlines()[1].strip() if len(str(err).splitlines()) > 1 else str(err)
        raise UserError(f"{path} does not fit the detector of this config: {reason}") from None


def _read_label_encoder(cfg: Config, class_names: list[str], path: str) -> dict:
    """A Step-1 artifact for this run's detector family, classes and pyramid (the backbone may differ)."""
    artifact = load_label_encoder(path)
    check_compatible(artifact["meta"], _encoder_meta(cfg, class_names), path)
    return artifact


def _read_teacher(cfg: Config, class_names: list[str], path: str) -> nn.Module:
    """The trained detector in ``path``, built from the model config it records with its weights, in eval mode.

    Any backbone; its family, FPN width and classes must be this run's, so that its features have the keys and shapes
    of this detector's.
    """
    state, trained = read_detector_weights(path, cfg, class_names, ("family", "fpn_channels"), what="teacher")
    try:
        model_cfg = ModelConfig.model_validate({**trained, "backbone_weights": None})  # the weights are in the file
    except ValidationError as err:
        raise CheckpointError(f"{path} records a model config this labelenc cannot build: "
                              + "; ".join(e["msg"] for e in err.errors())) from None
    teacher = build_detector(model_cfg, len(class_names))
    load_strictly(teacher, state, path)
    return teacher.eval()


# ------------------------------------------------------------------------------------------------ feature targets


@dataclass(frozen=True)
class FeatureTarget:
    """A Step-2 target provided by one input file, which ``input.read`` reads and checks."""

    input: RunInput
    target: Callable[[Config, Any], nn.Module]  # (config, what the file holds) -> (image list, targets) -> features
    init: Callable[[nn.Module, Any], object] | None = None  # Step-2 initialisation of the detector from the file


def _label_encoder_target(cfg: Config, artifact: dict) -> nn.Module:
    return LabelEncoderTarget(encoder_from_artifact(artifact), FAMILIES[cfg.model.family].with_masks)


def _teacher_target(cfg: Config, teacher: nn.Module) -> nn.Module:
    return TeacherTarget(teacher.backbone)


TARGETS: dict[str, FeatureTarget] = {
    # the paper's Step 2: target h(y) of the frozen h, head (and matching FPN layers) from Step 1
    "label_encoder": FeatureTarget(
        RunInput("label_encoder", f"{LABEL_ENCODER} written by step1", _read_label_encoder),
        _label_encoder_target, init=init_detector_from_artifact,
    ),
    # vanilla knowledge distillation (Table 6): a trained teacher's backbone + FPN features, no initialisation
    "teacher": FeatureTarget(
        RunInput("teacher", "model_final.pth or checkpoint_*.pth of a trained detector (knowledge distillation: "
                 "its backbone + FPN features are the target)", _read_teacher),
        _teacher_target,
    ),
}


# ------------------------------------------------------------------------------------------------ stages


def _baseline(cfg: Config, detector: nn.Module, class_names: list[str], inputs: Mapping[str, str]) -> Objective:
    return Objective(Baseline(detector), cfg.train.max_iters)


def _label_encoder_writer(model: nn.Module, detector: nn.Module, meta: dict) -> Callable[[Path, dict], dict[str, Path]]:
    """``save_outputs`` of a Step 1: h of ``model`` and the detector's head(s) as the run's label_encoder.pth."""

    def save(output_dir: Path, config: dict) -> dict[str, Path]:
        save_label_encoder(output_dir / LABEL_ENCODER, model.encoder, detector, meta, config)
        return {"label_encoder": output_dir / LABEL_ENCODER}  # as the stage's ``outputs`` declare

    return save


def _step1(cfg: Config, detector: nn.Module, class_names: list[str], inputs: Mapping[str, str]) -> Objective:
    """Eq. 9 after a warm-up without L3 (paper: 30k iterations) that moves the LR decays back by as much."""
    method, total = cfg.labelenc, cfg.train.max_iters
    warmup = round(method.step1_warmup * cfg.train.base_iters)
    meta = _encoder_meta(cfg, class_names)
    model = Step1(detector, build_label_encoder(meta), method.reconstruction_weight, method.detection_weight,
                  method.distance_weight, method.box_jitter)
    distance = weight_on_between(warmup, warmup + total, method.distance_weight)
    return Objective(model, warmup + total, {"distance": distance}, lr_offset=warmup,
                     save_outputs=_label_encoder_writer(model, detector, meta))


def _step1_recon(cfg: Config, detector: nn.Module, class_names: list[str], inputs: Mapping[str, str]) -> Objective:
    """Table 2: L1 alone, h and the head(s) without an image backbone; no L3, hence no warm-up and no LR offset."""
    meta = _encoder_meta(cfg, class_names, image_backbone=False)
    model = ReconstructionOnly(detector, build_label_encoder(meta), cfg.labelenc.reconstruction_weight,
                               cfg.labelenc.box_jitter)
    return Objective(model, cfg.train.max_iters, save_outputs=_label_encoder_writer(model, detector, meta))


def _step2(
    cfg: Config, detector: nn.Module, class_names: list[str], inputs: Mapping[str, str], initialise: bool = True,
    supervise: bool = True,
) -> Objective:
    """Eq. 7 towards the given target, with the distance loss off for the last ``distance_cutoff`` of the run.

    Table 5 leaves one part out: ``initialise=False`` keeps the detector's random head and FPN; ``supervise=False``
    trains the initialised detector with its own losses alone (no target, no adaption net).
    """
    method, total = cfg.labelenc, cfg.train.max_iters
    name = next(name for name in TARGETS if inputs.get(name))
    source = TARGETS[name]
    held = source.input.read(cfg, class_names, inputs[name])
    if initialise and source.init is not None:
        source.init(detector, held)
    if not supervise:
        return Objective(Baseline(detector), total)
    cutoff = total - round(method.distance_cutoff * total)
    model = Step2(detector, source.target(cfg, held), method.distance_weight)
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
    "step2", "step2", "LabelEnc Step 2: train a detector supervised by a frozen label encoder (or, for knowledge "
    "distillation, by a trained teacher's features)", _step2,
    inputs=tuple(t.input for t in TARGETS.values()), one_input_of=True,
    pipeline_rows=(("LabelEnc", "step2", "1x"),),
))
# ablations (paper, Tables 2 and 5): no pipeline rows
register_stage(Stage(
    "step1_recon", "step1-recon", "ablation: Step 1 with the reconstruction loss only (h and the head, no image "
    f"backbone); writes {LABEL_ENCODER}, no detector", _step1_recon,
    outputs={"label_encoder": LABEL_ENCODER}, trains_detector=False,
))
register_stage(Stage(
    "step2_supervision_only", "step2-supervision-only", "ablation: Step 2 with the distance loss to h(y) but a "
    "random head and FPN (no initialisation from Step 1)", partial(_step2, initialise=False),
    inputs=(TARGETS["label_encoder"].input,),
))
register_stage(Stage(
    "step2_init_only", "step2-init-only", "ablation: Step 2 with the head and FPN initialised from Step 1 but no "
    "distance loss", partial(_step2, supervise=False),
    inputs=(TARGETS["label_encoder"].input,), find_unused_parameters=False,
))
