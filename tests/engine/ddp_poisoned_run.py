"""Launched by tests/engine/test_distributed.py with torchrun: one stage where one process's loss is non-finite at
one iteration. Registers the poisoned stage through the public registry, trains it with ``labelenc.runner.train`` and
writes a fingerprint of every process's trained parameters to ``REPORT`` (JSON, from the first process).

Usage: torchrun --nproc_per_node 2 ddp_poisoned_run.py CONFIG STAGE POISON_RANK POISON_CALL REPORT [LABEL_ENCODER]
"""

from __future__ import annotations

import hashlib
import json
import sys

import torch

from labelenc.config import load_config
from labelenc.engine.distributed import all_gather_objects, get_rank, is_main_process, shutdown_distributed
from labelenc.runner import train
from labelenc.stages import STAGES, Stage, register_stage

config, stage, poison_rank, poison_call, report = sys.argv[1:6]
inputs = {"label_encoder": sys.argv[6]} if len(sys.argv) > 6 else {}
built: list[torch.nn.Module] = []


def poisoned(cfg, detector, class_names, run_inputs):
    """The stage's own objective, whose loss is NaN on one process at one call."""
    objective = STAGES[stage].build(cfg, detector, class_names, run_inputs)
    model, forward, calls = objective.model, objective.model.forward, [0]

    def forward_with_poison(images, targets):
        losses = forward(images, targets)
        if get_rank() == int(poison_rank) and calls[0] == int(poison_call):
            first = next(iter(losses))
            losses[first] = losses[first] * float("nan")
        calls[0] += 1
        return losses

    model.forward = forward_with_poison
    built.append(model)
    return objective


register_stage(Stage(f"{stage}_poisoned", f"{stage}_poisoned", "test only", poisoned,
                     find_unused_parameters=STAGES[stage].find_unused_parameters))
train(load_config(config), f"{stage}_poisoned", inputs)
digest = hashlib.sha256()
for name, tensor in sorted(built[0].named_parameters()):  # BatchNorm statistics are per process in DDP
    digest.update(name.encode() + tensor.detach().cpu().contiguous().numpy().tobytes())
fingerprints = all_gather_objects(digest.hexdigest())
if is_main_process():
    with open(report, "w") as f:
        json.dump({"fingerprints": fingerprints}, f)
shutdown_distributed()
