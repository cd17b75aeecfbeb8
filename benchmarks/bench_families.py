"""Issue 11's embedded benchmark: the paper's Table 1 for several detector families and seeds, run side by side.

Starts one ``labelenc pipeline CONFIG --seeds S`` process per (config, seed), all at once (or ``--parallel`` at a
time), because one small detector leaves most of a GPU idle: its iterations are bound by kernel launches, so several
processes share the GPU at little cost each. When a config's seeds have all finished, ``labelenc pipeline CONFIG
--seeds 0,1,2`` reuses their runs and writes the config's report over all seeds (mean ± std, the paired difference
LabelEnc − baseline 2x per seed with its 95% interval). Each process logs to ``<output_dir>/logs/seed<S>.log``.

Runs stopped by ``--time-limit`` keep their checkpoints: the same command continues them.

Usage: python benchmarks/bench_families.py [--configs A.yaml B.yaml] [--seeds 0,1,2] [KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from labelenc.config import load_config

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


def pipeline_command(config: str, seeds: list[int], overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "labelenc.cli", "pipeline", config, "--seeds", ",".join(map(str, seeds)),
            *overrides]


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
    queue = [(config, seed) for seed in seeds for config in args.configs]
    running: dict[tuple[str, int], tuple[subprocess.Popen, Path]] = {}
    failed: set[str] = set()
    start, last_poll = time.monotonic(), 0.0
    limit = args.parallel or len(queue)
    while queue or running:
        while queue and len(running) < limit:
            config, seed = queue.pop(0)
            log = logs[config] / f"seed{seed}.log"
            with log.open("w") as out:
                proc = subprocess.Popen(pipeline_command(config, [seed], args.overrides), stdout=out,
                                        stderr=subprocess.STDOUT, env=env)
            running[config, seed] = proc, log
        for key, (proc, log) in list(running.items()):
            if proc.poll() is not None:
                del running[key]
                status = "done" if proc.returncode == 0 else f"FAILED (exit {proc.returncode}), see {log}"
                print(f"[{time.monotonic() - start:6.0f} s] {key[0]} seed {key[1]}: {status}", flush=True)
                if proc.returncode != 0:
                    failed.add(key[0])
        elapsed = time.monotonic() - start
        if args.time_limit and elapsed > args.time_limit and running:
            print(f"[{elapsed:6.0f} s] time limit: stopping {len(running)} pipelines (they resume from their "
                  "checkpoints when run again)", flush=True)
            for proc, _ in running.values():
                proc.terminate()
            for key, (proc, _) in running.items():
                proc.wait()
                failed.add(key[0])
            break
        if elapsed - last_poll >= args.poll:
            last_poll = elapsed
            for (config, seed), (_, log) in running.items():
                print(f"[{elapsed:6.0f} s] {Path(config).stem} seed {seed}: {last_line(log)}", flush=True)
        time.sleep(1.0)
    for config in args.configs:
        if config in failed:
            print(f"{config}: not every seed finished; no report over seeds", flush=True)
            continue
        report = subprocess.run(pipeline_command(config, seeds, args.overrides), env=env, capture_output=True,
                                text=True)
        print(report.stdout if report.returncode == 0 else report.stderr, flush=True)
        if report.returncode != 0:
            failed.add(config)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
