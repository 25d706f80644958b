"""The torch device option: which strings are torch devices, and what this machine has."""

import pytest
import torch

from actcomp.devices import list_devices
from actcomp.app.torch_device import is_torch_device, torch_device


@pytest.mark.parametrize("spec", ["cpu", "cuda", "cuda:0", "cuda:1", "mps"])
def test_torch_device_strings(spec):
    assert is_torch_device(spec)


def test_no_builtin_profile_name_is_a_torch_device():
    """The deprecated `--device <profile>` is told apart by this: it must hold for every profile."""
    names = [d.name for d in list_devices()]
    assert names and not any(is_torch_device(n) for n in names)
    assert not is_torch_device("board.toml") and not is_torch_device("CPU")


def test_cpu_and_none():
    assert torch_device(None) == torch.device("cpu") == torch_device("cpu")


@pytest.mark.parametrize(
    "spec, message",
    [
        ("stm32h743", "is not a torch device; give cpu, cuda, cuda:N or mps"),
        ("meta", "actcomp trains on cpu, cuda, mps, xpu, not meta"),
        ("cpu:3", "this machine has 1 cpu device"),
    ],
)
def test_refused(spec, message):
    with pytest.raises(ValueError, match=message):
        torch_device(spec)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_without_cuda_is_a_clear_error():
    with pytest.raises(ValueError, match="this machine has no cuda device"):
        torch_device("cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_index_beyond_the_devices():
    assert torch_device("cuda:0").type == "cuda"
    with pytest.raises(ValueError, match="cuda device\\(s\\), numbered from 0"):
        torch_device(f"cuda:{torch.cuda.device_count()}")
