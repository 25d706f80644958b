import signal
import subprocess

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


def sigkill_when_blocked(argv: list[str], cwd) -> None:
    """Run ``argv`` in a child process until it prints BLOCKED (its write is under way and
    held there), then SIGKILL it; fail if it ends before that."""
    child = subprocess.Popen(argv, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in child.stdout:
            if line.strip() == "BLOCKED":
                break
        else:
            pytest.fail(f"the child ended without reaching the write: {child.wait()} {child.stderr.read()[-2000:]}")
        child.send_signal(signal.SIGKILL)
        assert child.wait(timeout=60) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        child.stdout.close()
        child.stderr.close()


@pytest.fixture(autouse=True)
def _one_thread_for_levers(request):
    """tests/levers use tiny float64 models: one intra-op thread is faster than several (and
    does not spin against other processes on a shared machine). Kept here, not in a conftest of
    that folder: a second conftest module would shadow this one for ``from conftest import``."""
    if "levers" not in request.node.path.parts:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
