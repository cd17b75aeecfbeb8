"""Issue 11's embedded benchmark: the paper's Table 1 for several detector families and seeds, run side by side.

Starts, for each (config, seed), one ``labelenc train`` process per baseline run (1x, 2x) and one ``labelenc
pipeline CONFIG --seeds S --skip-baselines`` process for Step 1 then Step 2, all at once (or ``--parallel`` at a
time), because one small detector leaves most of a GPU idle: its iterations are bound by kernel launches, so several
processes share the GPU at little cost each, and the longest chain (Step 1 then Step 2) sets the wall time. Each
baseline trains in the folder where the pipeline looks for it, with the config the pipeline would give it. When a
config's processes have all finished, ``labelenc pipeline CONFIG --seeds 0,1,2`` reuses their runs and writes the
config's report over all seeds (mean ± std, the paired difference LabelEnc − baseline 2x per seed with its 95%
interval). Each process logs to ``<output_dir>/logs/seed<S>_<job>.log``.

Runs stopped by ``--time-limit`` keep their checkpoints: the same command continues them (finished runs are reused).

Usage: python benchmarks/bench_families.py [--configs A.yaml B.yaml] [--seeds 0,1,2] [KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from labelenc import runner
from labelenc.config import load_config
from labelenc.stages import STAGES
from labelenc.tables import table1

DEFAULT_CONFIGS = ["configs/bench_fcos_synth.yaml", "configs/bench_retinanet_synth.yaml",
                   "configs/bench_faster_rcnn_synth.yaml"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS, help="pipeline configs, one per family")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    parser.add_argument("--parallel", type=int, default=0, help="pipelines at a time (0: all at once)")
    parser.add_argument("--time-limit", type=float, default=0.0,
                        help="seconds after which unfinished pipelines are stopped (0: none)")
    parser.add_argument("--poll", type=float, default=30.0, help="seconds between progress lines")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides for every pipeline")
    return parser.parse_args(argv)


def pipeline_command(config: str, seeds: list[int], overrides: list[str], *flags: str) -> list[str]:
    return [sys.executable, "-m", "labelenc.cli", "pipeline", config, "--seeds", ",".join(map(str, seeds)),
            *flags, *overrides]


def seed_jobs(config: str, seed: int, overrides: list[str]) -> list[tuple[str, list[str]]]:
    """(name, command) of the processes that together train one seed's pipeline: Step 1 then Step 2 first (the
    longest), then one ``labelenc train --resume`` per baseline run not yet finished, in the pipeline's own folder."""
    cfg = load_config(config, overrides)
    jobs = [("labelenc", pipeline_command(config, [seed], overrides, "--skip-baselines"))]
    unfinished = set(unfinished_runs(config, [seed], overrides))  # a finished run's config is checked by the report
    for run in table1(cfg).runs:
        run_dir = Path(cfg.output_dir) / f"seed{seed}" / run.name
        if not STAGES[run.stage].baseline or run_dir not in unfinished:
            continue
        settings = [f"train.seed={seed}", f"train.schedule={run.schedule}", f"output_dir={run_dir}",
                    *(f"{key}={value}" for key, value in run.overrides.items())]
        jobs.append((run.name, [sys.executable, "-m", "labelenc.cli", STAGES[run.stage].command, config, "--resume",
                                *overrides, *settings]))
    return jobs


def unfinished_runs(config: str, seeds: list[int], overrides: list[str]) -> list[Path]:
    """The config's pipeline run folders, over the seeds, that hold no finished run (no run summary) yet."""
    cfg = load_config(config, overrides)
    folders = [Path(cfg.output_dir) / f"seed{seed}" / run.name for seed in seeds for run in table1(cfg).runs]
    return [folder for folder in folders if not (folder / runner.SUMMARY).is_file()]


def last_line(path: Path) -> str:
    try:
        lines = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return lines[-1][:160] if lines else ""


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           "PYTHONUNBUFFERED": "1"}  # one CPU thread each: many processes share the cores
    logs = {}
    for config in args.configs:
        log_dir = Path(load_config(config, args.overrides).output_dir) / "logs"  # a bad config fails here, early
        log_dir.mkdir(parents=True, exist_ok=True)
        logs[config] = log_dir
    queue = [(config, seed, name, command) for seed in seeds for config in args.configs
             for name, command in seed_jobs(config, seed, args.overrides)]
    running: dict[tuple[str, int, str], tuple[subprocess.Popen, Path]] = {}
    failed: set[str] = set()
    start, last_poll = time.monotonic(), 0.0
    limit = args.parallel or len(queue)
    while queue or running:
        while queue and len(running) < limit:
            config, seed, name, command = queue.pop(0)
            log = logs[config] / f"seed{seed}_{name}.log"
            with log.open("w") as out:
                proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
            running[config, seed, name] = proc, log
        for key, (proc, log) in list(running.items()):
            if proc.poll() is not None:
                del running[key]
                status = "done" if proc.returncode == 0 else f"FAILED (exit {proc.returncode}), see {log}"
                print(f"[{time.monotonic() - start:6.0f} s] {key[0]} seed {key[1]} {key[2]}: {status}", flush=True)
                if proc.returncode != 0:
                    failed.add(key[0])
        elapsed = time.monotonic() - start
        if args.time_limit and elapsed > args.time_limit and running:
            print(f"[{elapsed:6.0f} s] time limit: stopping {len(running)} processes (their runs resume from "
                  "their checkpoints when run again)", flush=True)
            for proc, _ in running.values():
                proc.terminate()
            for proc, _ in running.values():
                proc.wait()  # whether their runs finished is checked below, run by run
            break
        if elapsed - last_poll >= args.poll:
            last_poll = elapsed
            for (config, seed, name), (_, log) in running.items():
                print(f"[{elapsed:6.0f} s] {Path(config).stem} seed {seed} {name}: {last_line(log)}", flush=True)
        time.sleep(1.0)
    for config in args.configs:  # a process stopped after its runs had finished (writing its report) lost nothing
        missing = unfinished_runs(config, seeds, args.overrides)
        if missing:
            print(f"{config}: no report over seeds; not finished yet: {', '.join(map(str, missing))} (the same "
                  "command continues them)", flush=True)
            failed.add(config)
            continue
        report = subprocess.run(pipeline_command(config, seeds, args.overrides), env=env, capture_output=True,
                                text=True)
        print(report.stdout if report.returncode == 0 else report.stderr, flush=True)
        if report.returncode != 0:
            failed.add(config)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
