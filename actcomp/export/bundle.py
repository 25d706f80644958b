"""export_bundle(): everything a device needs to fine-tune without PyTorch.

The directory holds step.onnx (the training step), model.onnx (inference), state.npz (the
state the runner continues from: weights, buffers and subspaces), initial_state.npz (the same,
never written by the runner, so the starting point is never lost), data.npz (training samples,
when given), manifest.json (how the step's inputs and outputs map to the state, shapes, number
of classes, the data's scale, settings, the step's static memory plan and, given a device
profile, the verdict) and runner.py (onnxruntime + numpy only).

A bundle is written as a whole: every file goes into a new directory beside ``out_dir``
(``.NAME.export-<pid>-<random>``), which is flushed to the disk and then put in the place of
``out_dir`` in one step (Linux: ``renameat2(RENAME_EXCHANGE)``, an atomic swap; elsewhere two
renames, between which a kill leaves the old bundle whole under ``.NAME.old-...``). A kill at
any point leaves the old bundle or the new one, never a mixture. One writer at a time: the
export holds the bundle's lock (:class:`actcomp.core.files.DirectoryLock`, the same lock file
the runner takes), so an export while a runner trains, or two exports, are refused naming the
holder. A bundle whose runner has trained (state.npz differs from initial_state.npz) is not
replaced unless ``overwrite=True``: exporting again starts from the model's weights, and the
trained state would be lost. ``out_dir`` may hold only a bundle's files: the whole directory
is replaced.
"""

from __future__ import annotations

import ctypes
import errno
import io
import json
import math
import os
import re
import secrets
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from actcomp.export.inference import onnx_inference
from actcomp.export.memory import graph_memory_plan
from actcomp.export.step import training_step
from actcomp.core.files import LOCK_NAME, DirectoryLock, atomic_write, atomic_write_text

#: The files of a bundle; a directory holding anything else is not replaced by an export.
BUNDLE_FILES = ("step.onnx", "model.onnx", "state.npz", "initial_state.npz", "data.npz", "manifest.json", "runner.py")
_OLD_BUNDLE_FILES = ("step.onnx.data",)  # bundles before this version shipped it (unreferenced)
_TEMPORARY = re.compile(r"(state|initial_state)\.npz(\.\d+\.[0-9a-f]+)?\.tmp")  # a killed runner's


def check_step_settings(*, max_rank: int, eps: float, momentum: float, lr: float) -> None:
    """Raise ValueError naming the first setting of the exported step that cannot work:
    ``max_rank >= 1``, ``0 < eps <= 1``, ``0 <= momentum < 1``, ``lr`` positive and finite."""
    if isinstance(max_rank, bool) or not isinstance(max_rank, int) or max_rank < 1:
        raise ValueError(f"max_rank must be a whole number >= 1, got {max_rank!r}")
    if not (isinstance(eps, (int, float)) and 0 < eps <= 1):
        raise ValueError(f"eps must be a number in (0, 1], got {eps!r}")
    if not (isinstance(momentum, (int, float)) and 0 <= momentum < 1):
        raise ValueError(f"momentum must be a number in [0, 1), got {momentum!r}")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a positive finite number, got {lr!r}")


def check_samples(x: Tensor, y: Tensor, num_classes: int, what: str) -> None:
    """Raise ValueError unless ``x`` is finite with one sample per label of ``y``, and ``y``
    holds integer class labels in ``0..num_classes-1``."""
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"{what}: x has {x.shape[0]} samples but y has {y.shape[0]} labels")
    if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool or y.dim() != 1:
        raise ValueError(f"{what}: y must be a 1-D tensor of integer class labels, got {y.dtype} of shape {tuple(y.shape)}")
    if len(y) and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(f"{what}: labels must lie in 0..{num_classes - 1} (the model has {num_classes} outputs), got {int(y.min())}..{int(y.max())}")
    if not bool(torch.isfinite(x.float()).all()):
        raise ValueError(f"{what}: x holds NaN or Inf")


def _save_arrays(path: Path, arrays: dict[str, np.ndarray]) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    atomic_write(path, buffer.getbuffer())


def _num_classes(model: nn.Module, x: Tensor) -> int:
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return int(model(x[:1]).shape[-1])
    finally:
        model.train(training)


def _bundle_path(out_dir: str | Path) -> Path:
    """The bundle's directory as an absolute path (a symbolic link followed); ValueError when it
    is a file, or the current directory or one holding it (the directory is replaced)."""
    out = Path(os.path.abspath(out_dir))
    if out.is_symlink():
        out = out.resolve()
    if out.exists() and not out.is_dir():
        raise ValueError(f"bundle directory '{out_dir}' is an existing file, not a directory")
    here = Path.cwd().resolve()
    if out.exists() and (here == out.resolve() or out.resolve() in here.parents):
        raise ValueError(f"bundle directory '{out_dir}' is the current directory or holds it; a bundle replaces its whole directory: give another path")
    if not out.name:
        raise ValueError(f"bundle directory '{out_dir}' is a file system root; give a directory below it")
    return out


def _trained(out: Path) -> bool:
    """Whether the bundle's state.npz holds other arrays than its initial_state.npz (a runner
    trained it; unreadable or without initial_state.npz counts as trained: it cannot be told)."""
    try:
        with np.load(out / "state.npz", allow_pickle=False) as state, np.load(out / "initial_state.npz", allow_pickle=False) as initial:
            return sorted(state.files) != sorted(initial.files) or not all(np.array_equal(state[k], initial[k]) for k in state.files)
    except Exception:  # noqa: BLE001 - missing, damaged or pickled: cannot tell
        return True


def _check_replaceable(out: Path, overwrite: bool) -> None:
    """ValueError unless ``out`` (held by this process) may be replaced by a new bundle: it holds
    nothing but a bundle's files, and not a trained state unless ``overwrite``."""
    names = set(os.listdir(out)) - {LOCK_NAME}
    unknown = sorted(n for n in names if n not in (*BUNDLE_FILES, *_OLD_BUNDLE_FILES) and not _TEMPORARY.fullmatch(n))
    if unknown:
        shown = ", ".join(unknown[:4]) + (", ..." if len(unknown) > 4 else "")
        raise ValueError(
            f"'{out}' holds files that are not a bundle's ({shown}); a bundle replaces its whole directory: "
            "give a new or empty directory"
        )
    if "state.npz" in names and not overwrite and _trained(out):
        raise ValueError(
            f"bundle '{out}' has been trained (its state.npz differs from initial_state.npz); a new export starts from the "
            "model's weights and that state would be lost: copy state.npz away and export with overwrite=True "
            "(--overwrite), or give another directory"
        )


def check_bundle_dir(out_dir: str | Path, *, overwrite: bool = False) -> None:
    """Before any work: ValueError when an export could not replace ``out_dir`` (a file, the
    current directory, files that are not a bundle's, a trained bundle without ``overwrite``).
    :func:`export_bundle` checks the same again while it holds the bundle."""
    out = _bundle_path(out_dir)
    if out.is_dir():
        _check_replaceable(out, overwrite)


def _exchange(new: Path, out: Path) -> bool:
    """Swap the directories ``new`` and ``out`` in one atomic step (Linux renameat2
    RENAME_EXCHANGE); False where the system or file system cannot."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # pragma: no cover - a C library without renameat2
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(new), at_fdcwd, os.fsencode(out), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):  # pragma: no cover - e.g. an old kernel
        return False
    raise OSError(code, os.strerror(code), str(out))


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _put_in_place(new: Path, out: Path) -> Path:
    """Put the complete directory ``new`` in the place of ``out``; returns where ``out``'s old
    content lies now (to be deleted)."""
    for f in new.iterdir():  # every file and the directory on the disk before it becomes the bundle
        _fsync(f)
    if os.name == "posix":
        _fsync(new)
    if _exchange(new, out):
        old = new
    else:  # pragma: no cover - not Linux: two renames (a kill between them leaves the old bundle at `old`)
        old = out.with_name(f".{out.name}.old-{os.getpid()}-{secrets.token_hex(4)}")
        os.rename(out, old)
        try:
            os.rename(new, out)
        except BaseException:
            os.rename(old, out)
            raise
    if os.name == "posix":
        _fsync(out.parent)
    return old


def _leftovers(out: Path) -> list[Path]:
    """Directories that killed exports of ``out`` left beside it (``.NAME.export-...``, ``.NAME.old-...``)."""
    pattern = re.compile(re.escape(f".{out.name}.") + r"(export|old)-\d+-[0-9a-f]+")
    return [out.parent / n for n in os.listdir(out.parent) if pattern.fullmatch(n)]


def export_bundle(
    model: nn.Module,
    example_batch: tuple[Tensor, Tensor],
    out_dir: str | Path,
    *,
    data: tuple[Tensor, Tensor] | None = None,
    device: str | None = None,
    max_rank: int = 8,
    eps: float = 0.9,
    momentum: float = 0.0,
    lr: float = 0.05,
    overwrite: bool = False,
) -> dict:
    """Write the bundle for fine-tuning ``model``'s trainable layers; returns the manifest.

    ``device`` is a device profile (name or .toml) to check the step's memory plan against.
    The settings, the example batch and ``data`` are checked first (labels in range, one
    label per sample, finite inputs). The manifest records ``num_classes`` and ``x_abs_max``
    (the largest |x| of the data) so that the runner can refuse labels out of range and data on
    another scale (uint8 images in 0..255 for a model trained on 0..1).

    The bundle is written as a whole into a new directory that then takes the place of
    ``out_dir`` (see the module's docstring): a kill leaves the old bundle or the new one. The
    export holds the bundle's lock meanwhile (a runner or another export there is refused with
    :class:`actcomp.core.files.Busy`). ``out_dir`` may hold only a bundle's files; a bundle whose
    runner has trained is replaced only with ``overwrite=True`` (else ValueError: its state
    would be lost).
    """
    check_step_settings(max_rank=max_rank, eps=eps, momentum=momentum, lr=lr)
    if device is not None and not hasattr(device, "budget_bytes"):
        from actcomp.devices import load_device

        load_device(device)  # an unknown profile fails here, before the export
    x, y = example_batch
    num_classes = _num_classes(model, x)
    check_samples(x, y, num_classes, "the example batch")
    if data is not None:
        check_samples(data[0], data[1], num_classes, "the bundle's data")
        if tuple(data[0].shape[1:]) != tuple(x.shape[1:]):
            raise ValueError(f"the bundle's data has samples of shape {tuple(data[0].shape[1:])}, the example batch {tuple(x.shape[1:])}")
    out = _bundle_path(out_dir)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        return _export_locked(model, example_batch, out, data, device, num_classes, overwrite, max_rank=max_rank, eps=eps, momentum=momentum, lr=lr)
    except BaseException:
        if created:  # nothing of a bundle came to be: leave no empty directory behind
            try:
                out.rmdir()
            except OSError:
                pass
        raise


def _export_locked(
    model: nn.Module, example_batch: tuple[Tensor, Tensor], out: Path, data: tuple[Tensor, Tensor] | None, device: str | None,
    num_classes: int, overwrite: bool, *, max_rank: int, eps: float, momentum: float, lr: float,
) -> dict:
    """:func:`export_bundle` once its settings are checked: claim ``out``, write the new bundle
    beside it and put it in place."""
    with DirectoryLock(out, "bundle", hint="wait for it to finish (a runner training it, or another export)") as lock:
        _check_replaceable(out, overwrite)
        for leftover in _leftovers(out):  # this process holds the bundle: no live export owns them
            shutil.rmtree(leftover, ignore_errors=True)
        new = out.with_name(f".{out.name}.export-{os.getpid()}-{secrets.token_hex(4)}")
        try:
            new.mkdir()
        except OSError as error:
            raise ValueError(f"bundle '{out}': cannot create '{new}' beside it ({error.strerror or error}); the directory above must be writable") from None
        try:
            manifest = _write_bundle(model, example_batch, new, data, device, num_classes, max_rank=max_rank, eps=eps, momentum=momentum, lr=lr)
            old = _put_in_place(new, out)
        except BaseException:
            shutil.rmtree(new, ignore_errors=True)
            raise
        lock.detach()  # the lock file went away with the old directory
        shutil.rmtree(old, ignore_errors=True)
    return manifest


def _write_bundle(
    model: nn.Module, example_batch: tuple[Tensor, Tensor], out: Path, data: tuple[Tensor, Tensor] | None, device: str | None,
    num_classes: int, *, max_rank: int, eps: float, momentum: float, lr: float,
) -> dict:
    """Every file of the bundle into the (new, empty) directory ``out``; returns the manifest."""
    x, _ = example_batch
    step = training_step(model, example_batch, out / "step.onnx", max_rank=max_rank, eps=eps, momentum=momentum, lr=lr)
    inference = onnx_inference(model, x[:1], out / "model.onnx")
    _save_arrays(out / "state.npz", step.initial_state)
    _save_arrays(out / "initial_state.npz", step.initial_state)
    if data is not None:
        _save_arrays(out / "data.npz", {"x": data[0].detach().numpy(), "y": data[1].detach().numpy()})
    scale = (data[0] if data is not None else x).detach().abs().max()
    plan = graph_memory_plan(step.path)
    manifest = {
        "step": "step.onnx",
        "inference": "model.onnx",
        "state_inputs": step.inputs[:-3],
        "inputs": step.inputs,
        "outputs": step.outputs,
        "batch_size": int(x.shape[0]),
        "x_shape": list(x.shape),
        "x_dtype": str(x.detach().numpy().dtype),
        "x_abs_max": float(scale),
        "num_classes": num_classes,
        "lr": lr,
        "eps": eps,
        "max_rank": max_rank,
        "momentum": momentum,
        "step_bytes": step.size_bytes,
        "inference_bytes": inference.size_bytes,
        "verified_max_abs_error": step.max_abs_error,
        "memory_plan": {"peak_bytes": plan.peak_bytes, "weights_bytes": plan.weights_bytes},
    }
    if device is not None:
        verdict = plan.verdict(device, weights_in_flash=True)
        manifest["memory_plan"]["verdict"] = str(verdict)
        manifest["memory_plan"]["fits"] = verdict.fits
    atomic_write_text(out / "manifest.json", json.dumps(manifest, indent=2))
    atomic_write(out / "runner.py", Path(__file__).with_name("runner.py").read_bytes())
    return manifest
