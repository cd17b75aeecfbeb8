"""Every registered optimizer leaves a parameter without a gradient untouched (A during the Step-1 warm-up)."""

from __future__ import annotations

import pytest
import torch

from labelenc.engine.optim import OPTIMIZERS


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_parameter_without_gradient_is_not_decayed_or_moved(name: str) -> None:
    torch.manual_seed(0)
    used, unused = torch.nn.Parameter(torch.randn(4)), torch.nn.Parameter(torch.randn(4))
    before, used_before = unused.detach().clone(), used.detach().clone()
    optimizer = OPTIMIZERS[name]([{"params": [used, unused]}], 0.1, 0.9, 0.1)
    for _ in range(3):
        optimizer.zero_grad(set_to_none=True)
        (used ** 2).sum().backward()
        optimizer.step()
    assert unused.grad is None and torch.equal(unused.detach(), before)
    assert not torch.equal(used.detach(), used_before)
