"""Experiments: a set of runs over seeds, reported as a table beside the paper's numbers.

An :class:`Experiment` lists its runs (stage, schedule, config overrides, and which earlier run provides each input
file), the rows and columns of its table, the paper's numbers, and the comparisons to judge with paired seed
statistics. :func:`run_experiment` trains what is missing (a finished run of the same config is reused, an
interrupted one resumes from its last checkpoint) and writes ``report.md``, ``report.json`` and ``report.png``.
The pipeline (the paper's Table 1) and every ablation table (``labelenc ablate``) are experiments.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import signal
from collections import Counter
from collections.abc import Mapping
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch

from labelenc import __version__, runner
from labelenc.config import Config, ConfigError, build_config, load_config
from labelenc.data.loader import build_datasets
from labelenc.engine.distributed import get_world_size
from labelenc.engine.hooks import read_metrics
from labelenc.engine.trainer import STEP_STATS
from labelenc.errors import UserError
from labelenc.fileio import write_atomic, write_json_atomic, write_text_atomic
from labelenc.models import FAMILIES
from labelenc.stages import STAGES
from labelenc.stats import mean_std, paired_difference

logger = logging.getLogger(__name__)

NOT_DETECTION = {"iteration", "loss", "feature_distance", *STEP_STATS}


@dataclass(frozen=True)
class RunSpec:
    """One run of an experiment, trained once per seed in ``seed<k>/<name>``."""

    name: str
    stage: str  # a key of STAGES
    schedule: str = "1x"
    overrides: Mapping[str, object] = field(default_factory=dict)  # dotted config keys, e.g. model.backbone
    inputs: Mapping[str, str] = field(default_factory=dict)  # stage input name -> name of the run providing it
    replaced_by: str | None = None  # an input given from outside that makes this run unnecessary


@dataclass(frozen=True)
class Column:
    """A metric column: ``metrics[iou_type][metric]`` of a run, in percent."""

    label: str
    iou_type: str = "bbox"
    metric: str = "AP"


BOX_COLUMNS = (Column("AP"), Column("AP50", metric="AP50"), Column("AP75", metric="AP75"))


@dataclass(frozen=True)
class Row:
    """A table row: the run it reports and the paper's value per column label (absent: the paper has none)."""

    label: str
    run: str
    paper: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Experiment:
    """Runs, table shape, paper numbers and the comparisons judged by paired differences over seeds."""

    title: str
    runs: tuple[RunSpec, ...]
    rows: tuple[Row, ...]
    columns: tuple[Column, ...] = BOX_COLUMNS
    compared_columns: int = 1  # paired differences on the first N columns
    comparisons: tuple[tuple[str, str], ...] = ()  # (method row, reference row)
    paper_source: str = ""  # which paper setting the paper column quotes
    notes: tuple[str, ...] = ()

    def check(self) -> None:
        """Refuse an experiment whose rows, comparisons or inputs name runs that do not exist."""
        names = [r.name for r in self.runs]
        rows = {r.label for r in self.rows}
        problems = [f"unknown stage {r.stage!r}" for r in self.runs if r.stage not in STAGES]
        problems += [f"row {r.label!r} names no run" for r in self.rows if r.run not in names]
        problems += [f"comparison names row {x!r}" for pair in self.comparisons for x in pair if x not in rows]
        for i, run in enumerate(self.runs):
            for key, src in run.inputs.items():
                if src not in names[:i]:
                    problems.append(f"{run.name} takes {key} from {src!r}, not an earlier run")
                elif self.runs[names.index(src)].replaced_by not in (None, key):
                    problems.append(f"{run.name} takes {key} from {src!r}, which a given "
                                    f"{self.runs[names.index(src)].replaced_by} replaces")
        if problems:
            raise ValueError(f"experiment {self.title!r}: " + "; ".join(problems))


def run_config(cfg: Config, run: RunSpec, run_dir: Path, seed: int) -> Config:
    """The config of one run: the experiment's config with the run's schedule, seed, overrides and directory."""
    raw = cfg.model_dump(mode="json")
    raw["train"].update(schedule=run.schedule, seed=seed)
    raw["output_dir"] = str(run_dir)
    for key, value in run.overrides.items():
        *parents, leaf = key.split(".")
        node = raw
        for part in parents:
            node = node[part]
        node[leaf] = value
    return build_config(raw, source=f"run {run_dir}")


def finished_summary(run_cfg: Config, inputs: Mapping[str, str]) -> dict | None:
    """The summary of a finished run with this config and these input files, or None; a damaged run folder, or a
    finished run of the same config trained from other input files, is an error naming it. A run folder moved
    elsewhere (its config's output_dir and its inputs' paths changed with it) is still the same run."""
    summary = Path(run_cfg.output_dir) / runner.SUMMARY
    config = Path(run_cfg.output_dir) / "config.yaml"
    if not (summary.is_file() and config.is_file()):
        return None
    try:
        recorded_cfg = load_config(config)  # keys added to the schema since then take their defaults
        result = json.loads(summary.read_text())
    except (OSError, UnicodeDecodeError, ConfigError, json.JSONDecodeError) as err:
        raise UserError(f"{run_cfg.output_dir} holds a damaged run ({type(err).__name__} reading its config.yaml or "
                        f"{runner.SUMMARY}); move it away or pass --overwrite") from None
    same = recorded_cfg.model_copy(update={"output_dir": run_cfg.output_dir}) == run_cfg
    if not (same and isinstance(result, dict) and "metrics" in result):
        return None
    recorded = result.get("inputs")  # summaries written before inputs were recorded: trusted
    difference = runner.input_difference(recorded, inputs) if recorded is not None else None
    if difference is not None:
        raise UserError(f"{run_cfg.output_dir} holds a finished run of this config, but {difference}; give "
                        "another output_dir or pass --overwrite")
    return result


def check_given_files(cfg: Config, runs: list[RunSpec], given: Mapping[str, str]) -> None:
    """Refuse a given input file (``--teacher``, ``--label-encoder``) that does not fit, before anything trains."""
    if not given:
        return
    train_set, _ = build_datasets(cfg, with_masks=FAMILIES[cfg.model.family].with_masks)
    for key, path in given.items():
        for run in runs:
            run_input = next((i for i in STAGES[run.stage].inputs if i.name == key and key in run.inputs), None)
            if run_input is not None:
                run_input.read(cfg, train_set.class_names, path)
                break


def _input_file(source: RunSpec, key: str, run_dir: Path) -> str:
    """The file a run provides as input ``key``: what its stage declares for it, else its detector weights."""
    return str(run_dir / STAGES[source.stage].outputs.get(key, runner.FINAL_WEIGHTS))


def planned_runs(experiment: Experiment, given: Mapping[str, str]) -> list[RunSpec]:
    """The runs to train: all but those whose output is given from outside."""
    return [r for r in experiment.runs if r.replaced_by is None or r.replaced_by not in given]


@dataclass(frozen=True)
class _Job:
    """One run of one seed, ready to train: its config, stage, input files and the jobs that write those files."""

    key: tuple[str, int]  # (run name, seed)
    cfg: Config
    stage: str
    inputs: Mapping[str, str]
    after: tuple[tuple[str, int], ...]


def _plan(experiment: Experiment, runs: list[RunSpec], seeds: list[int], configs: dict, given: Mapping[str, str]
          ) -> list[_Job]:
    """Every (run, seed) as a job, seed by seed in the experiment's run order (an input's source comes first)."""
    specs = {r.name: r for r in experiment.runs}
    jobs = []
    for seed in seeds:
        for run in runs:
            inputs = {key: given.get(key) or _input_file(specs[src], key, Path(configs[src, seed].output_dir))
                      for key, src in run.inputs.items()}
            after = tuple((src, seed) for key, src in run.inputs.items() if key not in given)
            jobs.append(_Job((run.name, seed), configs[run.name, seed], run.stage, inputs, after))
    return jobs


def _train_job(job: _Job, overwrite: bool) -> dict:
    """Train one job (an interrupted run of its config continues from its last checkpoint); its summary."""
    result = runner.train(job.cfg, job.stage, job.inputs, resume=not overwrite, overwrite=overwrite)
    return json.loads((result.output_dir / runner.SUMMARY).read_text())


def _start_worker(threads: int, lock, lines) -> None:
    """A --jobs worker process: its share of the CPU threads, the parent's logging, and a terminal line of its own
    for its progress bars."""
    from tqdm import tqdm

    from labelenc.engine.hooks import ProgressBar

    torch.set_num_threads(threads)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    tqdm.set_lock(lock)
    ProgressBar.position = lines.get()
    signal.signal(signal.SIGINT, _stop_quietly)


def _stop_quietly(signum: int, frame) -> None:
    """Ctrl-C reaches every worker with the parent. A worker waiting for its next run would die with a traceback
    of its own; it exits instead (one training a run stops it, and its last checkpoint stays for the rerun), and
    the parent reports the interruption once."""
    raise SystemExit(130)


def _train_in_parallel(jobs: list[_Job], overwrite: bool, processes: int) -> dict[tuple[str, int], dict]:
    """Train ``jobs`` in up to ``processes`` worker processes, a job once the jobs it reads from have finished.

    Jobs that others wait for start first, so that the chain Step 1 -> Step 2 runs beside the baselines. The CPU
    threads are shared out among the workers. If a job fails, no further job starts; the running ones finish (their
    runs are kept for the next attempt) before the first failure is raised.
    """
    waited_for = Counter(key for job in jobs for key in job.after)
    queue = sorted(jobs, key=lambda job: -waited_for[job.key])  # stable: otherwise seed and run order
    context = multiprocessing.get_context("spawn")  # fork would copy the parent's torch threads and locks
    lines = context.Queue()
    for line in range(processes):
        lines.put(line)
    threads = max(1, torch.get_num_threads() // processes)
    logger.info("training up to %d runs at once, %d CPU thread(s) each unless train.threads says otherwise",
                processes, threads)
    done: dict[tuple[str, int], dict] = {}
    running: dict[Future, _Job] = {}
    failure: BaseException | None = None
    with ProcessPoolExecutor(processes, mp_context=context, initializer=_start_worker,
                             initargs=(threads, context.RLock(), lines)) as pool:
        while queue or running:
            ready = [job for job in queue if all(key in done for key in job.after)] if failure is None else []
            for job in ready[: processes - len(running)]:
                queue.remove(job)
                running[pool.submit(_train_job, job, overwrite)] = job
            if not running:
                break
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                job = running.pop(future)
                try:
                    done[job.key] = future.result()
                except SystemExit:  # the worker was stopped by Ctrl-C (_stop_quietly): stop here too, whichever
                    raise KeyboardInterrupt from None  # of the two processes saw the signal first
                except Exception as err:  # noqa: BLE001 - re-raised below, once the running jobs are kept
                    if failure is None and running:
                        logger.error("%s failed; waiting for the %d run(s) still training", job.cfg.output_dir,
                                     len(running))
                    failure = failure or err
    if failure is not None:
        raise failure
    return done


def run_experiment(
    cfg: Config, experiment: Experiment, seeds: list[int], given: Mapping[str, str] | None = None,
    overwrite: bool = False, report_name: str = "report", jobs: int = 1,
) -> dict:
    """Train (or reuse) every run for every seed, then write ``<report_name>.md``, ``.json`` and ``.png``.

    Runs live in ``output_dir/seed<k>/<run name>``: experiments of one config share the runs they have in common.
    ``jobs`` > 1 trains up to that many runs at once, each in its own process (a CPU's threads shared out among them).
    """
    experiment.check()
    if jobs < 1:
        raise UserError(f"--jobs {jobs}: give at least 1")
    if jobs > 1 and get_world_size() > 1:
        raise UserError("--jobs trains several runs at once on this machine; under torchrun every process trains "
                        "the same run, so use --jobs 1")
    given = dict(given or {})
    root = Path(cfg.output_dir)
    runs = planned_runs(experiment, given)
    configs = {(run.name, seed): run_config(cfg, run, root / f"seed{seed}" / run.name, seed)
               for seed in seeds for run in runs}  # every config is checked before anything trains
    check_given_files(cfg, runs, given)
    summaries: dict[tuple[str, int], dict] = {}
    to_train = []
    for job in _plan(experiment, runs, seeds, configs, given):
        summary = None if overwrite else finished_summary(job.cfg, job.inputs)
        if summary is None:
            to_train.append(job)
        else:
            logger.info("reusing finished run %s", job.cfg.output_dir)
            summaries[job.key] = summary
    logger.info("%d run(s) reused, %d to train%s", len(summaries), len(to_train),
                "".join(f"\n  {job.cfg.output_dir}" for job in to_train))
    if jobs > 1 and len(to_train) > 1:
        summaries.update(_train_in_parallel(to_train, overwrite, jobs))
    else:
        summaries.update({job.key: _train_job(job, overwrite) for job in to_train})
    results = {run.name: [{**summaries[run.name, seed], "seed": seed,
                           "run_dir": str(configs[run.name, seed].output_dir)} for seed in seeds] for run in runs}
    report = build_report(cfg, experiment, seeds, results)
    write_json_atomic(root / f"{report_name}.json", report)
    write_text_atomic(root / f"{report_name}.md", report["markdown"])
    plot_report(experiment, report, root / f"{report_name}.png")
    print(report["markdown"])
    return report


def _values(runs: list[dict], column: Column) -> list[float | None]:
    """Per-seed values of a column in percent (None where the run evaluated nothing)."""
    values = []
    for run in runs:
        value = run["metrics"].get(column.iou_type, {}).get(column.metric)
        values.append(None if value is None else 100 * value)
    return values


def _fmt(mean: float | None, std: float | None, seeds: int) -> str:
    if mean is None:
        return "n/a"
    return f"{mean:.1f} ± {std:.1f}" if seeds > 1 else f"{mean:.1f}"


def _signed(x: float | None) -> str:
    return "n/a" if x is None else f"{x:+.1f}"


def _trained_on(results: dict[str, list[dict]]) -> str:
    """Where the runs trained, as their summaries record it, with how many runs each (reused runs may come from
    other machines than the one writing the report; a run resumed elsewhere counts for each of its machines)."""
    machines = Counter(machine for runs in results.values() for run in runs for machine in _machines_of(run))
    return "; ".join(f"{machine} ({count} run{'s' if count > 1 else ''})" for machine, count in machines.items())


def _machines_of(run: dict) -> list[str]:
    """The machines one run's summary says it trained on, each once, in order."""
    sessions = run.get("trained_on") or [{"machine": run.get("machine", "not recorded")}]
    return list(dict.fromkeys(session["machine"] for session in sessions))


def build_report(cfg: Config, experiment: Experiment, seeds: list[int], results: dict[str, list[dict]]) -> dict:
    """Rows (mean ± std per column, iterations, wall time), paired comparisons, and the markdown table."""
    rows: dict[str, dict] = {}
    for row in experiment.rows:
        runs = results.get(row.run)
        if not runs:
            continue  # its run was replaced by a given input
        stats = {c.label: mean_std(_values(runs, c)) for c in experiment.columns}
        stats["wall_time_s"] = mean_std([r["wall_time"] for r in runs])
        rows[row.label] = {**stats, "iterations": runs[0]["iterations"], "run": row.run,
                           "paper": dict(row.paper), "per_seed": {c.label: _values(runs, c)
                                                                  for c in experiment.columns}}
    comparisons = []
    for method, reference in experiment.comparisons:
        if method not in rows or reference not in rows:
            continue
        for column in experiment.columns[: experiment.compared_columns]:
            a, b = rows[method]["per_seed"][column.label], rows[reference]["per_seed"][column.label]
            if any(v is None for v in a + b):
                continue
            comparisons.append({"column": column.label, **paired_difference(method, a, reference, b).to_dict()})
    paper_columns = [c for c in experiment.columns if any(c.label in r.paper for r in experiment.rows)]
    lines = [
        "| run | iterations | " + " | ".join(c.label for c in experiment.columns)
        + "".join(f" | paper {c.label}" for c in paper_columns) + " | wall time (s) |",
        "|---|---|" + "---|" * (len(experiment.columns) + len(paper_columns)) + "---|",
    ]
    for label, s in rows.items():
        cells = [_fmt(*s[c.label], len(seeds)) for c in experiment.columns]
        cells += [f"{s['paper'][c.label]:.1f}" if c.label in s["paper"] else "–" for c in paper_columns]
        lines.append(f"| {label} | {s['iterations']} | " + " | ".join(cells)
                     + f" | {_fmt(*s['wall_time_s'], len(seeds))} |")
    if comparisons:
        lines += ["", "Paired differences over seeds (same seed, same data order), mean with 95% t-interval:", "",
                  "| comparison | metric | per seed | mean | 95% interval | verdict |", "|---|---|---|---|---|---|"]
        for c in comparisons:
            interval = "–" if c["low"] is None else f"[{c['low']:+.1f}, {c['high']:+.1f}]"
            per_seed = ", ".join(f"{d:+.1f}" for d in c["differences"])
            lines.append(f"| {c['method']} − {c['reference']} | {c['column']} | {per_seed} | {_signed(c['mean'])} | "
                         f"{interval} | {c['verdict']} |")
    header = (
        f"## {experiment.title}\n\n"
        f"Config: {cfg.model.family} {cfg.model.backbone}, FPN {cfg.model.fpn_channels}, 1x = "
        f"{cfg.train.base_iters} iterations of batch {cfg.train.batch_size}, seeds {seeds}; COCO metrics on the "
        f"val split, {'mean ± std over seeds' if len(seeds) > 1 else 'one seed'}.\n"
        + (f"Paper column: {experiment.paper_source}; it is at the paper's scale, so compare gaps, not levels.\n"
           if paper_columns else "")
        + f"Trained on: {_trained_on(results)}.\n"
        f"Report written on: {runner.machine_description()}; labelenc {__version__}; "
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC.\n\n"
    )
    notes = "".join(f"\n{note}\n" for note in experiment.notes)
    return {"title": experiment.title, "rows": rows, "comparisons": comparisons, "seeds": seeds, "runs": results,
            "markdown": header + "\n".join(lines) + "\n" + notes}


def _detection_loss(record: dict) -> float:
    return sum(v for k, v in record.items() if k not in NOT_DETECTION and not k.startswith("reconstruction_"))


def plot_report(experiment: Experiment, report: dict, path: Path) -> None:
    """Loss curves of every run (one colour per row, one line per seed) and the first column's bars with each
    seed's value as a point beside them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    column = experiment.columns[0]
    colours = plt.get_cmap("tab10").colors
    fig, (curves, bars) = plt.subplots(1, 2, figsize=(13, 4.8))
    for i, (label, row) in enumerate(report["rows"].items()):
        colour = colours[i % len(colours)]
        for j, run in enumerate(report["runs"][row["run"]]):
            records = read_metrics(Path(run["run_dir"]) / "metrics.jsonl")
            curves.plot([r["iteration"] for r in records], [_detection_loss(r) for r in records], color=colour,
                        alpha=1.0 if j == 0 else 0.35, label=label if j == 0 else None)
        mean, std = row[column.label]
        bars.bar(i, mean or 0.0, yerr=std or 0.0, capsize=4, color=colour, alpha=0.6)
        seeds = [v for v in row["per_seed"][column.label] if v is not None]
        bars.plot([i + 0.25] * len(seeds), seeds, "o", color="black", markersize=4)
        bars.text(i, (mean or 0.0) + (std or 0.0), "n/a" if mean is None else f"{mean:.1f}", ha="center",
                  va="bottom")
    curves.set(xlabel="iteration", ylabel="detection loss (detector's own terms)",
               title="training loss, every run (faint: further seeds)")
    curves.legend(fontsize=8)
    bars.set_xticks(range(len(report["rows"])), list(report["rows"]), rotation=20, ha="right", fontsize=8)
    bars.set(ylabel=f"{column.label} (val, %)", title=f"{column.label}: mean ± std, points: seeds")
    fig.suptitle(experiment.title, fontsize=10)
    fig.tight_layout()
    write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)
