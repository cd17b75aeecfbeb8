"""benchmarks/bench_families.py splits a seed's pipeline into processes: they must train what the pipeline reuses."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from labelenc.config import load_config
from labelenc.experiments import run_config
from labelenc.tables import table1

ROOT = Path(__file__).resolve().parents[1]


def _bench_families():
    spec = importlib.util.spec_from_file_location("bench_families", ROOT / "benchmarks" / "bench_families.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_each_baseline_process_trains_the_run_the_pipeline_reuses(tmp_path: Path) -> None:
    """Every baseline job's config (file + overrides as its command gives them) equals the pipeline's own config for
    that run, so the report over seeds reuses the run instead of training it again; Step 1 and 2 stay one job."""
    config = str(ROOT / "configs" / "bench_fcos_synth.yaml")
    overrides = ["train.base_iters=7", f"output_dir={tmp_path / 'bench'}"]
    jobs = dict(_bench_families().seed_jobs(config, 3, overrides))
    assert list(jobs) == ["labelenc", "baseline_1x", "baseline_2x"]
    assert jobs["labelenc"][-len(overrides) - 1:] == ["--skip-baselines", *overrides]
    cfg = load_config(config, overrides)
    for run in table1(cfg).runs[:2]:
        command = jobs[run.name]
        assert command[3:6] == ["train", config, "--resume"]
        wanted = run_config(cfg, run, tmp_path / "bench" / "seed3" / run.name, 3)
        assert load_config(config, command[6:]) == wanted


def test_finished_baselines_get_no_process(tmp_path: Path) -> None:
    config = str(ROOT / "configs" / "bench_fcos_synth.yaml")
    overrides = [f"output_dir={tmp_path}"]
    (tmp_path / "seed0" / "baseline_2x").mkdir(parents=True)
    (tmp_path / "seed0" / "baseline_2x" / "run_summary.json").write_text("{}")
    assert [name for name, _ in _bench_families().seed_jobs(config, 0, overrides)] == ["labelenc", "baseline_1x"]


def test_the_report_waits_for_every_run_of_every_seed(tmp_path: Path) -> None:
    """Runs without a summary are listed, whichever process trained them or was stopped after them."""
    config = str(ROOT / "configs" / "bench_fcos_synth.yaml")
    overrides = [f"output_dir={tmp_path}"]
    for seed in (0, 1):
        for name in ("baseline_1x", "baseline_2x", "step1", "step2"):
            (tmp_path / f"seed{seed}" / name).mkdir(parents=True)
            if (seed, name) != (1, "step2"):
                (tmp_path / f"seed{seed}" / name / "run_summary.json").write_text("{}")
    unfinished = _bench_families().unfinished_runs
    assert unfinished(config, [0, 1], overrides) == [tmp_path / "seed1" / "step2"]
    assert unfinished(config, [0], overrides) == []
