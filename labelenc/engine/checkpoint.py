"""Checkpoint files: written atomically by the main process, read back with ``weights_only=True``.

:func:`save_file` / :func:`load_file` are the format (tensors and plain data, stamped with a version);
:class:`Checkpointer` saves and restores one run directory's training state with them.
"""

from __future__ import annotations

import logging
import pickle
import re
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from labelenc import __version__
from labelenc.engine.distributed import all_gather_objects, get_rank, get_world_size, is_main_process, unwrap
from labelenc.errors import UserError
from labelenc.fileio import write_atomic, write_text_atomic

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1


class CheckpointError(UserError, RuntimeError):
    """A checkpoint or weights file that cannot be used; the message names the file."""


def save_file(payload: dict[str, Any], path: str | Path) -> None:
    """Write ``payload`` (tensors and plain data) to ``path`` atomically, stamped with the format version."""
    payload = {**payload, "format_version": FORMAT_VERSION, "labelenc_version": __version__}
    write_atomic(path, lambda f: torch.save(payload, f))


def load_file(path: str | Path, kind: str = "checkpoint") -> dict[str, Any]:
    """Read a file written by :func:`save_file`; refuses anything but tensors and plain data."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{kind} file not found: {path}")
    with path.open("rb") as f:
        head = f.read(4)
    if not head.startswith((b"PK\x03\x04", b"\x80")):  # torch.save's zip archive, or a legacy pickle
        what = "is empty" if not head else "looks like text" if _is_text(path) else "is in another binary format"
        raise CheckpointError(f"{path} is not a torch file: it {what}; expected a labelenc {kind} file (.pth)")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(
            f"refusing to load {kind} {path}: it holds Python objects other than tensors and plain data, "
            "or is corrupt; labelenc never executes code from a file"
        ) from None
    except Exception as err:  # truncated archives, empty files, foreign formats
        raise CheckpointError(f"cannot load {kind} {path}: truncated or not a torch file ({type(err).__name__})") from None
    if not isinstance(payload, dict) or "format_version" not in payload:
        raise CheckpointError(f"{path} is not a labelenc {kind} (no format_version)")
    if payload["format_version"] != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has {kind} format version {payload['format_version']}; this labelenc reads version {FORMAT_VERSION}"
        )
    return payload


def _is_text(path: Path) -> bool:
    try:
        path.read_bytes()[:512].decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


_CHECKPOINT_NAME = re.compile(r"checkpoint_\d+\.pth")


def _pointer_target(output_dir: Path) -> str | None:
    """The file name ``output_dir/last_checkpoint`` holds, if it holds one (it may be torn or overwritten)."""
    pointer = output_dir / "last_checkpoint"
    if not pointer.is_file():
        return None
    try:
        name = pointer.read_bytes().decode("utf-8").strip()
    except UnicodeDecodeError:
        name = ""
    if not _CHECKPOINT_NAME.fullmatch(name):
        logger.warning("%s does not name a checkpoint file (expected checkpoint_NNNNNNN.pth); using the newest "
                       "checkpoint_*.pth instead", pointer)
        return None
    return name


def checkpoints(output_dir: str | Path) -> list[Path]:
    """The run's checkpoints, newest first: the one ``last_checkpoint`` names, then ``checkpoint_*.pth`` by iteration."""
    output_dir = Path(output_dir)
    found = sorted(output_dir.glob("checkpoint_*.pth"), reverse=True)
    named = _pointer_target(output_dir)
    first = [output_dir / named] if named and (output_dir / named).is_file() else []
    return first + [p for p in found if p not in first]


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The checkpoint named in ``output_dir/last_checkpoint``, else the newest ``checkpoint_*.pth``, else None."""
    found = checkpoints(output_dir)
    return found[0] if found else None


class Checkpointer:
    """Saves and restores model, optimizer, scheduler, iteration and RNG state of one run directory, and the
    detector's weight average when the run keeps one."""

    def __init__(
        self, model: nn.Module, optimizer, scheduler, output_dir: str | Path, extra: dict, start_time: float | None = None,
        scaler: torch.amp.GradScaler | None = None, average: nn.Module | None = None, machine: str = "not recorded",
    ) -> None:
        self.model, self.optimizer, self.scheduler, self.scaler = model, optimizer, scheduler, scaler
        self.average = average
        self.output_dir = Path(output_dir)
        self.extra = extra  # config, stage: recorded in every file
        self.start_time = time.perf_counter() if start_time is None else start_time  # this process's start
        self.earlier_wall_time = 0.0  # seconds of the run's earlier processes, up to the resumed checkpoint
        self.machine = machine  # where this process trains
        self.start_iter = 0  # the iteration this process started from
        self.earlier_sessions: list[dict] = []  # the run's earlier processes, up to the resumed checkpoint

    def wall_time(self) -> float:
        """Seconds the run's kept work took: earlier processes up to the resumed checkpoint, plus this one."""
        return self.earlier_wall_time + time.perf_counter() - self.start_time

    def sessions(self, iteration: int) -> list[dict]:
        """Where the run's kept work up to ``iteration`` trained: each process that added iterations, with its
        machine, first and last iteration and wall time, so that a run resumed elsewhere names every machine."""
        this = {"machine": self.machine, "iterations": [self.start_iter, iteration],
                "wall_time": time.perf_counter() - self.start_time}
        return self.earlier_sessions + ([this] if iteration > self.start_iter else [])

    def save(self, name: str, iteration: int) -> Path:
        """Write the training state; every process calls it (each contributes its RNG state), the main one writes."""
        path = self.output_dir / f"{name}.pth"
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        rng_per_process = all_gather_objects(rng)
        if is_main_process():
            save_file(
                {
                    "model": unwrap(self.model).state_dict(),
                    "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict(),
                    "iteration": iteration,
                    "rng": rng,
                    "rng_per_process": rng_per_process,
                    "wall_time": self.wall_time(),
                    "trained_on": self.sessions(iteration),
                    **({"scaler": self.scaler.state_dict()} if self.scaler is not None and self.scaler.is_enabled()
                       else {}),
                    **({"weight_average": self.average.state_dict()} if self.average is not None else {}),
                    **self.extra,
                },
                path,
            )
            write_text_atomic(self.output_dir / "last_checkpoint", path.name)
        return path

    def resume(self) -> int:
        """Restore the newest checkpoint that loads; returns the iteration to continue from.

        A checkpoint that does not load (truncated by a crash or an incomplete copy) is set aside as ``*.broken``
        and the previous one is used; hidden ``*.tmp`` files left by a save that was killed are removed.
        """
        for leftover in self.output_dir.glob(".*.tmp"):
            if is_main_process():
                logger.warning("removing %s, left by a save that was interrupted", leftover)
                leftover.unlink(missing_ok=True)
        for path in checkpoints(self.output_dir):
            try:
                state = load_file(path)
                break
            except CheckpointError as err:
                logger.warning("%s; set aside as %s.broken, trying the previous checkpoint", err, path.name)
                if is_main_process():
                    path.rename(path.with_name(path.name + ".broken"))
        else:
            raise CheckpointError(f"--resume: no checkpoint in {self.output_dir} can be loaded; "
                                  "start afresh with --overwrite")
        unwrap(self.model).load_state_dict(state["model"])
        self.earlier_wall_time = state.get("wall_time", 0.0)
        self.start_iter = state["iteration"]
        self.earlier_sessions = state.get("trained_on") or (  # checkpoints written before machines were recorded
            [{"machine": "not recorded", "iterations": [0, self.start_iter], "wall_time": self.earlier_wall_time}]
            if self.start_iter > 0 else [])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
        if self.average is not None:  # resume refuses a changed train.ema_decay, so the checkpoint has one
            self.average.load_state_dict(state["weight_average"])
        per_process = state.get("rng_per_process", [state["rng"]])
        if len(per_process) != get_world_size():
            logger.warning("%s was written by %d process(es), this run has %d: each process restarts from the RNG "
                           "state of the first one, so the run will not repeat the interrupted one exactly",
                           path, len(per_process), get_world_size())
        rng = per_process[get_rank()] if len(per_process) == get_world_size() else per_process[0]
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        logger.info("resumed from %s at iteration %d", path, state["iteration"])
        return state["iteration"]
