import pytest
import torch


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| (absolute error when b is zero)."""
    a, b = a.detach(), b.detach()
    scale = b.norm()
    diff = (a - b).norm()
    return float(diff / scale) if scale > 0 else float(diff)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
