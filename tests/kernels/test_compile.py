"""torch.compile over a compressed model: every compressed class has a forward of its own
(dynamo keeps compiled frames per code object, guarded on the class) and the decomposition
runs eagerly, so a model with more than 8 compressed classes hits no recompile limit, and a
step computes what the eager compressed step computes."""

import copy
import logging

import pytest
import torch
from torch import nn

import actcomp


def many_classes():
    """Ten distinct compressed and neighbour classes (dynamo's recompile limit is 8)."""
    return nn.Sequential(
        nn.Conv1d(3, 4, 3), nn.ReLU(), nn.Conv1d(4, 4, 1), nn.ReLU6(), nn.MaxPool1d(2), nn.LeakyReLU(0.1),
        nn.Dropout(0.0), nn.Hardtanh(), nn.AvgPool1d(1), nn.Flatten(), nn.Linear(16, 5),
    )


@pytest.mark.skipif(not hasattr(torch, "compile"), reason="torch.compile is not available")
class _Records(logging.Handler):
    """dynamo's warnings go to its own logger, which does not propagate to the root's."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_compiled_step_hits_no_recompile_limit_and_matches_eager():
    torch.manual_seed(0)
    model = many_classes().double()
    actcomp.compress(model, eps=0.9)
    eager = copy.deepcopy(model)
    x = torch.randn(4, 3, 10, dtype=torch.float64).cumsum(-1)
    compiled = torch.compile(model, backend="eager")
    records, logger = _Records(), logging.getLogger("torch._dynamo")
    logger.addHandler(records)
    try:
        for _ in range(2):
            model.zero_grad()
            compiled(x).square().sum().backward()
    finally:
        logger.removeHandler(records)
    assert not [m for m in records.messages if "recompile_limit" in m]
    eager.zero_grad()
    eager(x).square().sum().backward()
    for a, b in zip(model.parameters(), eager.parameters()):
        assert torch.allclose(a.grad, b.grad, rtol=1e-10, atol=1e-12)
