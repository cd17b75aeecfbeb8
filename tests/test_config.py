"""Tests of labelenc.config: shipped YAML files, key.sub=value overrides, and error messages naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from labelenc.config import Config, ConfigError, apply_overrides, load_config, save_config
from labelenc.errors import UserError

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
SHIPPED = sorted(CONFIG_DIR.glob("*.yaml"))
MINIMAL = {
    "data": {
        "train": {"annotations": "d/train.json", "images": "d/train"},
        "val": {"annotations": "d/val.json", "images": "d/val"},
    }
}


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    """A minimal valid config file: only the required data section."""
    path = tmp_path / "minimal.yaml"
    path.write_text(yaml.safe_dump(MINIMAL))
    return path


def test_configs_folder_is_not_empty() -> None:
    """The repository ships at least one config (the demo)."""
    assert SHIPPED, f"no YAML files in {CONFIG_DIR}"


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_every_shipped_config_loads_and_round_trips(path: Path, tmp_path: Path) -> None:
    """Each configs/*.yaml validates, and its resolved config written by save_config reads back equal."""
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    resolved = tmp_path / "config.yaml"
    save_config(cfg, resolved)
    assert load_config(resolved) == cfg


def test_defaults_fill_a_minimal_file(config_file: Path) -> None:
    """Sections not given take the schema's defaults (the paper's 1x schedule, RetinaNet R50)."""
    cfg = load_config(config_file)
    assert cfg.model.family == "retinanet" and cfg.model.backbone == "resnet50"
    assert cfg.train.base_iters == 90000 and cfg.train.max_iters == 90000
    assert cfg.data.train.annotations == "d/train.json"


def test_overrides_parse_yaml_values(config_file: Path) -> None:
    """Overrides parse numbers, null, booleans, lists and strings, at any depth, and create missing sections."""
    cfg = load_config(
        config_file,
        [
            "train.base_lr=0.005",
            "train.weight_decay=1e-5",
            "train.batch_size=4",
            "train.grad_clip=null",
            "train.amp=true",
            "train.schedule=2x",
            "train.lr_decay_points=[0.5, 0.75]",
            "model.anchor_sizes=[4,8,16,32,64]",
            "model.backbone_weights=/w/r50.pth",
            "data.val.images=/elsewhere/val",
            "labelenc.encoder_width=0.25",
            "output_dir=runs/x=y",
        ],
    )
    assert cfg.train.base_lr == 0.005 and cfg.train.weight_decay == 1e-5
    assert cfg.train.batch_size == 4 and cfg.train.grad_clip is None and cfg.train.amp == "bf16"  # YAML true
    assert cfg.train.max_iters == 2 * cfg.train.base_iters
    assert cfg.train.lr_decay_points == (0.5, 0.75)
    assert cfg.model.anchor_sizes == [4, 8, 16, 32, 64]
    assert cfg.model.backbone_weights == "/w/r50.pth"
    assert cfg.data.val.images == "/elsewhere/val" and cfg.data.val.annotations == "d/val.json"
    assert cfg.labelenc.encoder_width == 0.25
    assert cfg.output_dir == "runs/x=y"  # only the first '=' separates key and value


def test_apply_overrides_returns_a_copy() -> None:
    """apply_overrides leaves its input mapping unchanged and replaces earlier values with later ones."""
    raw = {"train": {"batch_size": 8}}
    out = apply_overrides(raw, ["train.batch_size=2", "train.batch_size=3", "model.family=fcos"])
    assert raw == {"train": {"batch_size": 8}}
    assert out == {"train": {"batch_size": 3}, "model": {"family": "fcos"}}


@pytest.mark.parametrize(
    "override, message",
    [("train.batch_size", "key.sub=value"), ("=3", "key.sub=value"), ("data.train.images.sub=1", "'images' is not a section")],
)
def test_malformed_overrides(config_file: Path, override: str, message: str) -> None:
    """An override without 'key=' or one that descends into a scalar is a ConfigError quoting it."""
    with pytest.raises(ConfigError, match=message) as info:
        load_config(config_file, [override])
    assert repr(override) in str(info.value)


@pytest.mark.parametrize(
    "override, key, allowed",
    [
        ("train.learning_rate=0.1", "train.learning_rate", ["base_lr", "batch_size", "lr_decay_points", "warmup_iters"]),
        ("optimizer=sgd", "optimizer", ["data", "labelenc", "model", "output_dir", "train"]),
        ("data.train.path=x", "data.train.path", ["annotations", "images"]),
    ],
)
def test_unknown_key_names_it_and_lists_allowed_keys(
    config_file: Path, override: str, key: str, allowed: list[str]
) -> None:
    """An unknown key is a ConfigError naming the key and every key allowed at that level."""
    with pytest.raises(ConfigError) as info:
        load_config(config_file, [override])
    message = str(info.value)
    assert isinstance(info.value, UserError)
    assert f"{key}: unknown key" in message and str(config_file) in message
    listed = [k.strip() for k in message.split("allowed keys here:")[1].split("\n")[0].split(",")]
    assert set(allowed) <= set(listed) and key.split(".")[-1] not in listed


@pytest.mark.parametrize(
    "override, key, allowed",
    [
        ("model.family=yolo", "model.family", ["retinanet", "fcos", "faster_rcnn", "mask_rcnn"]),
        ("model.backbone=vgg16", "model.backbone",
         ["resnet18", "resnet34", "resnet50", "resnet101", "mobilenet_v3_large"]),
        ("train.device=tpu", "train.device", ["auto", "cpu", "cuda"]),
        ("train.schedule=3x", "train.schedule", ["1x", "2x"]),
        ("train.batch_size=many", "train.batch_size", ["integer"]),
        ("train.base_lr=-1", "train.base_lr", ["greater than 0"]),
        ("data.flip_prob=2", "data.flip_prob", ["less than or equal to 1"]),
        ("model.anchor_sizes=8", "model.anchor_sizes", ["list"]),
    ],
)
def test_wrong_value_names_the_key_and_allowed_values(
    config_file: Path, override: str, key: str, allowed: list[str]
) -> None:
    """A value of the wrong type or outside a literal set is a ConfigError naming the key and what is allowed."""
    with pytest.raises(ConfigError) as info:
        load_config(config_file, [override])
    line = next(line for line in str(info.value).splitlines() if line.strip().startswith(key))
    assert all(word in line for word in allowed), line


def test_missing_required_section(tmp_path: Path) -> None:
    """A config without the data section names data as a missing required key."""
    path = tmp_path / "no_data.yaml"
    path.write_text("model: {family: fcos}\n")
    with pytest.raises(ConfigError, match="data: required key is missing"):
        load_config(path)


@pytest.mark.parametrize(
    "content, message",
    [(None, "not found"), ("model: {family: [retinanet\n", "not valid YAML"), ("- a\n- b\n", "mapping"),
     (b"\x89PNG\r\n\x1a\n\xff\xfe", "not a readable text file")],
    ids=["missing", "malformed", "not-mapping", "binary"],
)
def test_unusable_config_file_names_it(tmp_path: Path, content: str | bytes | None, message: str) -> None:
    """A missing, malformed, non-mapping or binary config file is a ConfigError naming the file."""
    path = tmp_path / "broken.yaml"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError, match=message) as info:
        load_config(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    "points, valid",
    [("[0.5, 0.75]", True), ("[0.5, 0.5]", True), ("[0.9, 0.5]", False), ("[0, 0.5]", False), ("[0.5, 1.0]", False),
     ("[0.5]", False), ("[0.2, 0.4, 0.6]", False)],
)
def test_lr_decay_points_validation(config_file: Path, points: str, valid: bool) -> None:
    """lr_decay_points must be two fractions with 0 < first <= second < 1."""
    override = f"train.lr_decay_points={points}"
    if valid:
        cfg = load_config(config_file, [override, "train.base_iters=1000"])
        assert cfg.train.decay_milestones(1000) == [round(f * 1000) for f in yaml.safe_load(points)]
    else:
        with pytest.raises(ConfigError, match="lr_decay_points"):
            load_config(config_file, [override])


def test_anchor_sizes_refused_for_fcos(config_file: Path) -> None:
    """FCOS takes no anchor sizes: setting them is a ConfigError naming the key; other families accept them."""
    with pytest.raises(ConfigError, match="anchor_sizes"):
        load_config(config_file, ["model.family=fcos", "model.anchor_sizes=[8,16,32,64,128]"])
    assert load_config(config_file, ["model.family=fcos"]).model.anchor_sizes is None
    cfg = load_config(config_file, ["model.family=faster_rcnn", "model.anchor_sizes=[8,16,32,64,128]"])
    assert cfg.model.anchor_sizes == [8, 16, 32, 64, 128]


def test_fcos_needs_fpn_channels_divisible_by_32(config_file: Path) -> None:
    """FCOS's GroupNorm(32) head needs fpn_channels % 32 == 0: others are a ConfigError naming the key at load time."""
    with pytest.raises(ConfigError, match="fpn_channels"):
        load_config(config_file, ["model.family=fcos", "model.fpn_channels=16"])
    assert load_config(config_file, ["model.family=fcos", "model.fpn_channels=32"]).model.fpn_channels == 32
    assert load_config(config_file, ["model.family=retinanet", "model.fpn_channels=16"]).model.fpn_channels == 16


def test_assignment_is_validated(config_file: Path) -> None:
    """Changing a field of a loaded config is validated too (the schema cannot be bypassed after loading)."""
    cfg = load_config(config_file)
    with pytest.raises(ValueError):
        cfg.model.family = "yolo"


def test_head_norm_defaults_to_the_familys_head(config_file: Path, tmp_path: Path) -> None:
    """model.head_norm is unset by default (a config or an old run's config.yaml without it resolves the same);
    group / none round-trip; a value the family cannot build or a group head on 16 channels is a ConfigError."""
    assert load_config(config_file).model.head_norm is None
    for family in ("retinanet", "fcos", "faster_rcnn", "mask_rcnn"):
        assert load_config(config_file, [f"model.family={family}"]).model.head_norm is None
    cfg = load_config(config_file, ["model.head_norm=group", "model.fpn_channels=64"])
    assert cfg.model.head_norm == "group"
    save_config(cfg, tmp_path / "saved.yaml")
    assert load_config(tmp_path / "saved.yaml") == cfg
    assert load_config(config_file, ["model.head_norm=none"]).model.head_norm == "none"
    with pytest.raises(ConfigError, match="head_norm"):
        load_config(config_file, ["model.head_norm=batch"])
    with pytest.raises(ConfigError, match="model.head_norm='none' does not apply to fcos"):
        load_config(config_file, ["model.family=fcos", "model.head_norm=none"])
    with pytest.raises(ConfigError, match="model.head_norm='group' does not apply to faster_rcnn"):
        load_config(config_file, ["model.family=faster_rcnn", "model.head_norm=group"])
    with pytest.raises(ConfigError, match="fpn_channels must be a multiple of 32 for retinanet"):
        load_config(config_file, ["model.head_norm=group", "model.fpn_channels=16"])
