"""Shared by the benchmark scripts: where and how a measurement was taken."""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import sys

import torch


def machine_info(device: torch.device) -> dict:
    """Date, machine, load, torch build, threads, device and the exact command of this run."""
    return {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "node": platform.node(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "loadavg_1min": round(os.getloadavg()[0], 2),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": f"cuda ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "cpu",
        "command": shlex.join([os.path.relpath(sys.executable), *sys.argv]),
    }
