"""The paper's Table-1 comparison for one config: baseline 1x, baseline 2x, step1-only and LabelEnc (Step 2).

Every run uses the same data, model config and seed; a run whose directory already holds a finished result for
the same config is reused and an interrupted one resumes from its last checkpoint, so an interrupted pipeline
continues where it stopped.
"""

from __future__ import annotations

import json
import logging
import platform
import statistics
from datetime import datetime, timezone
from pathlib import Path

import torch

from labelenc import __version__, runner
from labelenc.config import Config, ConfigError, build_config, load_config
from labelenc.engine.hooks import read_metrics
from labelenc.errors import UserError
from labelenc.fileio import write_atomic, write_json_atomic, write_text_atomic
from labelenc.stages import STAGES

logger = logging.getLogger(__name__)

# (row name, run directory, stage, schedule), in the registry's order: each stage's inputs come from earlier runs
RUNS = [(row, run_dir, stage.name, schedule)
        for stage in STAGES.values() for row, run_dir, schedule in stage.pipeline_rows]
METRICS = ("AP", "AP50", "AP75")
NOT_DETECTION = {"iteration", "loss", "lr", "time", "data_time", "feature_distance"}


def _run_config(cfg: Config, run_dir: Path, schedule: str, seed: int) -> Config:
    raw = cfg.model_dump(mode="json")
    raw["train"].update(schedule=schedule, seed=seed)
    raw["output_dir"] = str(run_dir)
    return build_config(raw, source=f"pipeline run {run_dir}")


def _finished(run_cfg: Config) -> dict | None:
    """The summary of a finished run with this exact config, or None; a damaged run folder is an error naming it."""
    summary = Path(run_cfg.output_dir) / runner.SUMMARY
    config = Path(run_cfg.output_dir) / "config.yaml"
    if not (summary.is_file() and config.is_file()):
        return None
    try:
        same = load_config(config) == run_cfg  # keys added to the schema since then take their defaults
        result = json.loads(summary.read_text())
    except (OSError, UnicodeDecodeError, ConfigError, json.JSONDecodeError) as err:
        raise UserError(f"{run_cfg.output_dir} holds a damaged run ({type(err).__name__} reading its config.yaml or "
                        f"{runner.SUMMARY}); move it away or pass --overwrite") from None
    return result if same and isinstance(result, dict) and "metrics" in result else None


def run_pipeline(
    cfg: Config, seeds: list[int], skip_baselines: bool = False, label_encoder: str | None = None,
    overwrite: bool = False,
) -> dict:
    """Run the comparison for every seed; write report.md, report.json and report.png to ``cfg.output_dir``."""
    root = Path(cfg.output_dir)
    given = {"label_encoder": label_encoder} if label_encoder else {}
    results: dict[str, list[dict]] = {row: [] for row, *_ in RUNS}
    for seed in seeds:
        seed_dir = root / f"seed{seed}"  # per seed, so a later multi-seed call reuses finished runs
        inputs = dict(given)  # files written by this seed's earlier runs, by name
        for row, name, stage, schedule in RUNS:
            recipe = STAGES[stage]
            if (skip_baselines and recipe.baseline) or (recipe.outputs and set(recipe.outputs) <= set(given)):
                continue
            run_cfg = _run_config(cfg, seed_dir / name, schedule, seed)
            summary = None if overwrite else _finished(run_cfg)
            if summary is None:
                # an interrupted run of this config continues from its last checkpoint
                result = runner.train(run_cfg, stage, inputs, resume=not overwrite, overwrite=overwrite)
                summary = json.loads((result.output_dir / runner.SUMMARY).read_text())
            else:
                logger.info("reusing finished run %s", run_cfg.output_dir)
            inputs.update({key: str(Path(run_cfg.output_dir) / file) for key, file in recipe.outputs.items()})
            results[row].append({**summary, "seed": seed, "run_dir": str(run_cfg.output_dir)})
    report = _report(cfg, seeds, results)
    write_json_atomic(root / "report.json", report)
    write_text_atomic(root / "report.md", report["markdown"])
    _plot(results, root / "report.png")
    print(report["markdown"])
    return report


def _mean_std(values: list[float | None]) -> tuple[float, float] | tuple[None, None]:
    """Mean and sample std over seeds; (None, None) when a run evaluated nothing (no val images or boxes)."""
    if any(v is None for v in values):
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _percent(runs: list[dict], metric: str) -> list[float | None]:
    return [None if r["metrics"]["bbox"][metric] is None else 100 * r["metrics"]["bbox"][metric] for r in runs]


def _report(cfg: Config, seeds: list[int], results: dict[str, list[dict]]) -> dict:
    rows = {}
    for row, runs in results.items():
        if not runs:
            continue
        stats = {m: _mean_std(_percent(runs, m)) for m in METRICS}
        stats["wall_time_s"] = _mean_std([r["wall_time"] for r in runs])
        stats["iterations"] = runs[0]["iterations"]
        rows[row] = stats
    def fmt(mean: float | None, std: float | None) -> str:
        if mean is None:
            return "n/a"
        return f"{mean:.1f} ± {std:.1f}" if len(seeds) > 1 else f"{mean:.1f}"

    lines = [
        f"| run | iterations | {' | '.join(METRICS)} | wall time (s) |",
        "|---|---|" + "---|" * len(METRICS) + "---|",
    ]
    for row, s in rows.items():
        cells = " | ".join(fmt(*s[m]) for m in METRICS)
        lines.append(f"| {row} | {s['iterations']} | {cells} | {fmt(*s['wall_time_s'])} |")
    machine = f"{platform.node() or 'unknown'} ({platform.machine()}, {torch.get_num_threads()} threads, " \
              f"{'CUDA ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU'})"
    header = (
        f"Config: {cfg.model.family} {cfg.model.backbone}, FPN {cfg.model.fpn_channels}, "
        f"1x = {cfg.train.base_iters} iterations of batch {cfg.train.batch_size}, seeds {seeds}. "
        f"LabelEnc costs step1 + step2 iterations (compare with baseline 2x). COCO bbox metrics on the val split, "
        f"{'mean ± std over seeds' if len(seeds) > 1 else 'one seed'}.\n"
        f"Machine: {machine}; torch {torch.__version__}; labelenc {__version__}; "
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC.\n\n"
    )
    return {"rows": rows, "seeds": seeds, "runs": results, "markdown": header + "\n".join(lines) + "\n"}


def _detection_loss(record: dict) -> float:
    return sum(v for k, v in record.items() if k not in NOT_DETECTION and not k.startswith("reconstruction_"))


def _plot(results: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (curves, bars) = plt.subplots(1, 2, figsize=(12, 4.5))
    names, means, stds, labels = [], [], [], []
    for row, runs in results.items():
        if not runs:
            continue
        log = Path(runs[0]["run_dir"]) / "metrics.jsonl"
        records = read_metrics(log)
        curves.plot([r["iteration"] for r in records], [_detection_loss(r) for r in records], label=row)
        names.append(row)
        m, s = _mean_std(_percent(runs, "AP"))
        labels.append("n/a" if m is None else f"{m:.1f}")  # n/a: nothing was evaluated, an empty bar
        means.append(m or 0.0)
        stds.append(s or 0.0)
    curves.set(xlabel="iteration", ylabel="detection loss (detector's own terms)", title="training loss (first seed)")
    curves.legend()
    bars.bar(names, means, yerr=stds, capsize=4, color=["#999999", "#666666", "#6a9fd8", "#d8823a"][: len(names)])
    for i, (m, s, label) in enumerate(zip(means, stds, labels)):
        bars.text(i, m + s, label, ha="center", va="bottom")
    bars.set(ylabel="COCO AP (val)", title="AP")
    fig.tight_layout()
    write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)
