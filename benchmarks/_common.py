"""Shared by the benchmark scripts: where and how a measurement was taken."""

from __future__ import annotations

import datetime
import os
import shlex
import sys

import torch

from labelenc.runner import machine_description


def machine_info(device: torch.device) -> dict:
    """Date, machine (as a run's summary records it), CPU count, load and the exact command of this run."""
    return {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": machine_description(device),
        "cpus": os.cpu_count(),
        "loadavg_1min": round(os.getloadavg()[0], 2),
        "command": shlex.join([os.path.relpath(sys.executable), *sys.argv]),
    }


def machine_header(info: dict) -> str:
    """The first line of every benchmark's output: what :func:`machine_info` recorded."""
    return (f"machine {info['machine']}; {info['cpus']} CPUs, load avg {info['loadavg_1min']}; {info['date']}; "
            f"command: {info['command']}")
