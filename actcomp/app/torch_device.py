"""The torch device a command trains and measures on (``--device cpu|cuda|cuda:0|mps``).

Not to be confused with :mod:`actcomp.devices`: that package holds *device profiles*, the
memory and compute of edge devices a run is planned for (``--target stm32h743``, a .toml file);
this module only resolves the ``torch.device`` the tensors live on. In the application, a
"torch device" is what ``--device`` names and a "profile" (or target) what ``--target`` names.
A string that ``torch.device`` accepts names a torch device; anything else (``stm32h743``,
``board.toml``) cannot be one, which is how the command line tells the deprecated
``--device <profile>`` spelling apart.
"""

from __future__ import annotations

import torch

TRAINABLE_TYPES = ("cpu", "cuda", "mps", "xpu")


def is_torch_device(spec: str) -> bool:
    """True when ``torch.device(spec)`` accepts ``spec`` (``cpu``, ``cuda``, ``cuda:1``, ``mps``, ...)."""
    try:
        torch.device(spec)
    except (RuntimeError, ValueError, TypeError):
        return False
    return True


def _available(device_type: str) -> tuple[bool, int]:
    """Whether this machine has torch devices of ``device_type`` (cpu, cuda, ...), and how many."""
    if device_type == "cpu":
        return True, 1
    if device_type == "cuda":
        return torch.cuda.is_available(), torch.cuda.device_count()
    if device_type == "mps":
        return torch.backends.mps.is_available(), 1
    xpu = getattr(torch, "xpu", None)
    ok = xpu is not None and xpu.is_available()
    return ok, xpu.device_count() if ok else 0


def torch_device(spec: str | torch.device | None) -> torch.device:
    """The ``torch.device`` for ``spec`` (``None`` is the CPU), checked to exist on this machine.

    Raises ValueError for a string torch does not accept, a device type actcomp does not train
    on (``meta``, ...), a type this machine lacks (``cuda`` without CUDA) or an index beyond the
    devices present (``cuda:3`` with one GPU). A bare ``cuda`` means the current CUDA device.
    """
    if spec is None:
        return torch.device("cpu")
    if isinstance(spec, str) and not is_torch_device(spec):
        raise ValueError(f"--device {spec!r} is not a torch device; give cpu, cuda, cuda:N or mps")
    device = torch.device(spec)
    if device.type not in TRAINABLE_TYPES:
        raise ValueError(f"--device {str(device)!r}: actcomp trains on {', '.join(TRAINABLE_TYPES)}, not {device.type}")
    ok, count = _available(device.type)
    if not ok:
        raise ValueError(f"--device {str(device)!r}: this machine has no {device.type} device (torch {torch.__version__}); use --device cpu")
    if device.index is not None and device.index >= count:
        raise ValueError(f"--device {str(device)!r}: this machine has {count} {device.type} device(s), numbered from 0")
    return device


__all__ = ["TRAINABLE_TYPES", "is_torch_device", "torch_device"]
