"""The paper's Table-1 comparison for one config: baseline 1x, baseline 2x, step1-only and LabelEnc (Step 2).

Every run uses the same data, model config and seed; a run whose directory already holds a finished result for
the same config is reused and an interrupted one resumes from its last checkpoint, so an interrupted pipeline
continues where it stopped. The report adds the paired difference LabelEnc − baseline 2x per seed with its 95%
interval (see :mod:`labelenc.experiments`).
"""

from __future__ import annotations

from labelenc.config import Config
from labelenc.experiments import run_experiment
from labelenc.tables import table1


def run_pipeline(
    cfg: Config, seeds: list[int], skip_baselines: bool = False, label_encoder: str | None = None,
    overwrite: bool = False, jobs: int = 1,
) -> dict:
    """Run the comparison for every seed (up to ``jobs`` runs at once); write report.md, report.json and report.png
    to ``cfg.output_dir``."""
    given = {"label_encoder": label_encoder} if label_encoder else {}
    return run_experiment(cfg, table1(cfg, skip_baselines), seeds, given, overwrite, jobs=jobs)
