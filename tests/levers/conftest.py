import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    """These tests use tiny float64 models: one intra-op thread is faster than several (and
    does not spin against other processes on a shared machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
