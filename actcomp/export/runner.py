"""Fine-tune on a device with onnxruntime and numpy only (no PyTorch): the bundle's runner.

    python runner.py [--steps 20] [--lr 0.05] [--data data.npz] [--state state.npz] [--out state.npz]

Reads manifest.json beside it, runs the exported training step (step.onnx) with onnxruntime's
CUDA provider where the installed build has one (Jetson) and the CPU otherwise, on consecutive
batches of the data (x, y arrays in an .npz), feeding each step's new weights, buffers and
subspaces to the next (fresh output arrays: no buffer is written while it is read), prints the
loss of every step and saves the final state.

Nothing is lost: the state is written to a temporary file, flushed to the disk and renamed
over the old one, so a kill or a full disk leaves the old state whole; the bundle's
initial_state.npz is never written; a step that yields NaN or Inf stops the run and nothing is
saved. Bad input (labels out of range, float labels, x and y of different lengths, data on
another scale than the bundle's, a non-positive or non-finite lr, steps < 1, missing or
damaged files) is one line on stderr and exit code 2; a diverged run or a failed write is one
line and exit code 1. This file is copied into every bundle.
"""

from __future__ import annotations

import argparse
import errno
import io
import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort

SCALE_FACTOR = 10.0  # data whose largest |x| exceeds this many times the bundle's is refused


class InputError(ValueError):
    """Input the runner cannot train on: exit code 2."""


class Diverged(RuntimeError):
    """A step produced NaN or Inf: nothing is saved, exit code 1."""


def providers() -> list[str]:
    """CUDA (a Jetson's GPU) when this onnxruntime build has it, else the CPU."""
    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


def load_arrays(path: Path, what: str) -> dict[str, np.ndarray]:
    """The arrays of an .npz file (no pickled objects); InputError naming the file otherwise."""
    try:
        with np.load(path, allow_pickle=False) as arrays:
            return {name: arrays[name] for name in arrays.files}
    except FileNotFoundError:
        raise InputError(f"{what} '{path}' does not exist") from None
    except Exception as error:  # zipfile.BadZipFile, ValueError (pickled objects), OSError, ...
        raise InputError(f"{what} '{path}' is not a readable .npz file ({type(error).__name__}: {error})") from None


def check_settings(steps: int, lr: float | None) -> None:
    """``steps`` at least 1, ``lr`` (when given) positive and finite."""
    if steps < 1:
        raise InputError(f"--steps must be at least 1, got {steps}")
    if lr is not None and not (math.isfinite(lr) and lr > 0):
        raise InputError(f"--lr must be a positive finite number, got {lr}")


def check_data(arrays: dict[str, np.ndarray], manifest: dict, where: Path) -> tuple[np.ndarray, np.ndarray]:
    """x and y of the data file, checked against the manifest: one integer label per sample, in
    0..num_classes-1; samples of the exported shape, finite, on the bundle's scale (largest |x|
    at most SCALE_FACTOR times the exported data's, at least 1); at least one batch."""
    missing = [k for k in ("x", "y") if k not in arrays]
    if missing:
        raise InputError(f"data '{where}' lacks the array(s) {', '.join(missing)}; it needs x (samples) and y (labels)")
    x, y = arrays["x"], arrays["y"]
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise InputError(f"data '{where}': y must be a 1-D array of integer class labels, got {y.dtype} of shape {y.shape}")
    if len(x) != len(y):
        raise InputError(f"data '{where}': x has {len(x)} samples but y has {len(y)} labels")
    shape = tuple(manifest["x_shape"][1:])
    if tuple(x.shape[1:]) != shape:
        raise InputError(f"data '{where}': samples have shape {tuple(x.shape[1:])}, the step takes {shape}")
    classes = manifest.get("num_classes")
    if len(y) and (y.min() < 0 or (classes is not None and y.max() >= classes)):
        bound = f"0..{classes - 1}" if classes is not None else "0 and above"
        raise InputError(f"data '{where}': labels must lie in {bound}, got {y.min()}..{y.max()}")
    if not (np.issubdtype(x.dtype, np.number) and not np.issubdtype(x.dtype, np.complexfloating)):
        raise InputError(f"data '{where}': x must hold real numbers, got {x.dtype}")
    if not np.isfinite(x).all():
        raise InputError(f"data '{where}': x holds NaN or Inf")
    scale = manifest.get("x_abs_max")
    largest = float(np.abs(x).max()) if x.size else 0.0
    if scale is not None and largest > SCALE_FACTOR * max(1.0, scale):
        hint = " (uint8 images: divide by 255)" if np.issubdtype(x.dtype, np.integer) else ""
        raise InputError(
            f"data '{where}': |x| reaches {largest:g} but the bundle's data reaches {scale:g}; "
            f"scale the samples as the model was trained{hint}"
        )
    if len(y) < manifest["batch_size"]:
        raise InputError(f"data '{where}' holds {len(y)} samples; the step's static batch is {manifest['batch_size']}")
    return x.astype(manifest["x_dtype"]), y.astype(np.int64)


def check_state(state: dict[str, np.ndarray], names: list[str], where: Path) -> None:
    """Every state input the step needs is present and finite."""
    missing = [n for n in names if n not in state]
    if missing:
        raise InputError(f"state '{where}' lacks {', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}; is it this bundle's?")
    bad = [n for n in names if not np.isfinite(state[n]).all()]
    if bad:
        raise InputError(f"state '{where}' holds NaN or Inf in {', '.join(bad[:3])}; start from the bundle's initial_state.npz")


def train(bundle: Path, steps: int, lr: float | None = None, data: Path | None = None, state: Path | None = None) -> tuple[dict, list[float]]:
    """Run ``steps`` training steps; returns the final state and the losses. Raises InputError
    for bad input (before any step) and Diverged at the first step whose loss or new state
    holds NaN or Inf."""
    check_settings(steps, lr)
    try:
        manifest = json.loads((bundle / "manifest.json").read_text())
    except (OSError, ValueError) as error:
        raise InputError(f"'{bundle / 'manifest.json'}' is missing or damaged ({error})") from None
    state_path = state or bundle / "state.npz"
    data_path = data or bundle / "data.npz"
    names = manifest["state_inputs"]
    current = load_arrays(state_path, "state")
    check_state(current, names, state_path)
    x, y = check_data(load_arrays(data_path, "data"), manifest, data_path)
    session = ort.InferenceSession(str(bundle / manifest["step"]), providers=providers())
    batch = manifest["batch_size"]
    rate = np.array(manifest["lr"] if lr is None else lr, dtype=manifest["x_dtype"])
    losses = []
    for step in range(steps):
        start = (step * batch) % (len(y) - batch + 1)
        feeds = {name: current[name] for name in names}
        feeds.update(x=x[start : start + batch], y=y[start : start + batch], lr=rate)
        outputs = session.run(None, feeds)
        if not all(np.isfinite(o).all() for o in outputs):
            raise Diverged(f"step {step + 1} produced NaN or Inf (loss {float(outputs[-1])}); nothing was saved: lower --lr")
        current = dict(zip(names, outputs[:-1]))
        losses.append(float(outputs[-1]))
    return current, losses


def _fsync_directory(directory: Path) -> None:
    if os.name == "posix":
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def save_state(path: Path, state: dict[str, np.ndarray]) -> None:
    """Write ``state`` to ``path`` atomically: PATH.tmp, fsync, rename, fsync of the directory.
    A kill leaves the old file whole; a failure removes PATH.tmp and leaves the old file."""
    buffer = io.BytesIO()
    np.savez(buffer, **state)
    view = buffer.getbuffer()
    tmp = path.with_name(path.name + ".tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            done = 0
            while done < len(view):
                done += os.write(fd, view[done : done + (1 << 20)])
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException as error:
        tmp.unlink(missing_ok=True)
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
            raise OSError(error.errno, f"disk full: could not write '{path}'; the previous file is left as it was") from None
        raise
    _fsync_directory(path.parent)


def main(argv: list[str] | None = None) -> int:
    """Train and save; errors are one line on stderr (exit 2 for input, 1 for divergence or I/O)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--data", type=Path)
    parser.add_argument("--state", type=Path)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    bundle = Path(__file__).resolve().parent
    out = args.out or bundle / "state.npz"
    try:
        if out.is_dir() or not out.parent.is_dir():
            raise InputError(f"--out '{out}' must be a file in an existing directory")
        if out.resolve() == (bundle / "initial_state.npz").resolve():
            raise InputError("--out must not be initial_state.npz: that file keeps the bundle's starting point")
        state, losses = train(bundle, args.steps, args.lr, args.data, args.state)
        for step, loss in enumerate(losses, 1):
            print(f"step {step}: loss {loss:.6f}")
        initial = bundle / "initial_state.npz"
        if not initial.exists() and (bundle / "state.npz").exists():  # a bundle from before initial_state.npz
            save_state(initial, load_arrays(bundle / "state.npz", "state"))
        save_state(out, state)
    except InputError as error:
        print(f"runner.py: error: {error}", file=sys.stderr)
        return 2
    except (Diverged, OSError) as error:
        print(f"runner.py: error: {error}", file=sys.stderr)
        return 1
    print(f"saved {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
