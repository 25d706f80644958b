"""Fine-tune on a device with onnxruntime and numpy only (no PyTorch): the bundle's runner.

    python runner.py [--steps 20] [--lr 0.05] [--data data.npz] [--state state.npz] [--out state.npz]

Reads manifest.json beside it, runs the exported training step (step.onnx) with onnxruntime's
CUDA provider where the installed build has one (Jetson) and the CPU otherwise, on consecutive
batches of the data (x, y arrays in an .npz), feeding each step's new weights, buffers and
subspaces to the next (fresh output arrays: no buffer is written while it is read), prints the
loss of every step and saves the final state.

Nothing is lost: one runner (or export) writes a bundle at a time: the bundle is claimed with
the lock file .actcomp.lock (created with O_CREAT | O_EXCL, holding pid, host and start time;
a second writer is refused naming the holder, a lock of a process that died is taken over).
The state is written to a temporary file of this runner's own name, flushed to the disk and
renamed over the old one, so a kill or a full disk leaves the old state whole; the bundle's
initial_state.npz is never written, and --out may not name any other file of the bundle
(manifest.json, step.onnx, data.npz, ...). A run that diverges saves nothing: a step whose loss
or new state holds NaN or Inf, or whose loss exceeds DIVERGENCE_FACTOR (1e6) times the first
step's loss (or 1e6 when the first is below 1), stops the run. Bad input (labels out of range,
float labels, x and y of different lengths, data on another scale than the bundle's, a
non-positive or non-finite lr, steps < 1, missing or damaged files: a manifest, step graph or
state that does not fit) is one line on stderr and exit code 2; a diverged run or a failed
write is one line and exit code 1. This file is copied into every bundle.
"""

from __future__ import annotations

import argparse
import errno
import io
import json
import math
import os
import re
import secrets
import socket
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

try:  # POSIX: the lock's holder keeps an flock on it, which dies with the holder
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

SCALE_FACTOR = 10.0  # data whose largest |x| exceeds this many times the bundle's is refused
DIVERGENCE_FACTOR = 1e6  # a loss above this many times the first step's (at least 1) is a diverged run
LOCK_NAME = ".actcomp.lock"
# The bundle's own files: --out may name none of them (state.npz, the default, excepted).
BUNDLE_FILES = ("manifest.json", "step.onnx", "model.onnx", "data.npz", "initial_state.npz", "runner.py", LOCK_NAME)


class InputError(ValueError):
    """Input the runner cannot train on: exit code 2."""


class Diverged(RuntimeError):
    """A step produced NaN or Inf, or a loss beyond DIVERGENCE_FACTOR times the first: nothing
    is saved, exit code 1."""


class Busy(InputError):
    """Another runner or export holds the bundle: exit code 2."""


class ReadOnly(InputError):
    """The bundle's directory cannot be written (a read-only medium): no lock can be taken, and
    none is needed unless the run writes into the bundle."""


# --- One writer per bundle (the same protocol as actcomp.core.files.DirectoryLock). ---


def _process_start(pid):
    """(state, start time in clock ticks after boot) of a process, from /proc (Linux); None elsewhere."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
        fields = text[text.rindex(")") + 2 :].split()
        return fields[0], int(fields[19])
    except (OSError, ValueError, IndexError):
        return None


def _alive(pid, start):
    if os.name != "posix":  # os.kill(pid, 0) would terminate the process on Windows: cannot tell
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    except (OverflowError, OSError):
        return False
    found = _process_start(pid)
    if found is not None and (found[0] == "Z" or (start is not None and found[1] != start)):
        return False
    return True


def _holder(text):
    try:
        info = json.loads(text)
    except ValueError:
        return None
    if not isinstance(info, dict) or not isinstance(info.get("host"), str):
        return None
    pid = info.get("pid")
    if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:
        return None
    return info


def _flock_briefly(fd, wait_s=0.5):
    """Take the flock of ``fd``, waiting up to ``wait_s`` for a process that breaks a stale lock
    (it holds the flock for an instant); True when taken, None when it stays held (its holder
    lives), False where the file system has no flock."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() > deadline:
                return None
            time.sleep(0.01)
        except OSError:
            return False


class BundleLock:
    """``with BundleLock(bundle):`` claims ``bundle/.actcomp.lock`` (O_CREAT | O_EXCL, pid, host,
    start time; an flock held while it lives) or raises Busy naming the holder; a lock whose
    holder is dead is removed (under its own flock, so only one process breaks it) and the
    claim retried. Leaving removes the file while it is still this lock's."""

    def __init__(self, directory):
        self.directory = Path(directory)
        self.path = self.directory / LOCK_NAME
        self.fd = None

    def busy(self, info):
        if info is None:
            holder = "a writer that is starting"
        else:
            holder = f"pid {info['pid']} on {info['host']}" + (f" since {info['started']}" if isinstance(info.get("started"), str) else "")
        tail = "" if info is None or info["host"] == socket.gethostname() else f"; if that process is no longer running, delete {self.path}"
        return Busy(f"bundle '{self.directory}' is in use by another writer: {holder} (lock {self.path}); wait for it to finish{tail}")

    def __enter__(self):
        found = _process_start(os.getpid())
        info = {
            "pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
            "pid_start": found[1] if found else None, "command": "runner.py",
        }
        for _ in range(20):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                self.break_stale()
                continue
            except OSError as error:
                if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
                    raise ReadOnly(f"bundle '{self.directory}' cannot be written ({error.strerror or error})") from None
                raise
            try:
                if fcntl is not None:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX)
                    except OSError:
                        pass
                os.write(fd, json.dumps(info).encode())  # not fsynced: after a power cut no holder is alive anyway
            except BaseException:
                os.close(fd)
                self.path.unlink(missing_ok=True)
                raise
            self.fd = fd
            return self
        raise self.busy(None)

    def break_stale(self):
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return
        try:
            if fcntl is not None and _flock_briefly(fd) is None:  # its holder keeps the flock: alive
                raise self.busy(_holder(os.read(fd, 1 << 16).decode("utf-8", "replace")))
            # This process now holds the file's flock (or the system has none): unless another
            # breaker removed it meanwhile, it stays the lock until we decide.
            status = os.fstat(fd)
            try:
                now = os.stat(self.path)
            except FileNotFoundError:
                return  # broken meanwhile: claim again
            if (now.st_dev, now.st_ino) != (status.st_dev, status.st_ino):
                return  # broken and claimed anew meanwhile: check the new holder
            info = _holder(os.read(fd, 1 << 16).decode("utf-8", "replace"))
            if info is None:
                if time.time() - status.st_mtime < 10.0:
                    raise self.busy(None)
            elif info["host"] != socket.gethostname() or _alive(info["pid"], info.get("pid_start") if isinstance(info.get("pid_start"), int) else None):
                raise self.busy(info)
            os.unlink(self.path)  # stale: its holder died
        finally:
            os.close(fd)

    def __exit__(self, *exc):
        fd, self.fd = self.fd, None
        if fd is None:
            return
        try:
            mine, now = os.fstat(fd), os.stat(self.path)
            if (now.st_dev, now.st_ino) == (mine.st_dev, mine.st_ino):
                os.unlink(self.path)
        except FileNotFoundError:
            pass
        finally:
            os.close(fd)


def temporaries(path):
    """Temporary files of ``path`` that a writer is filling or a killed one left:
    NAME.<pid>.<random>.tmp (and NAME.tmp of older runners)."""
    pattern = re.compile(re.escape(path.name) + r"(\.\d+\.[0-9a-f]+)?\.tmp")
    try:
        return [path.parent / n for n in os.listdir(path.parent) if pattern.fullmatch(n)]
    except OSError:
        return []


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


def _damaged(where: Path, what: str) -> InputError:
    return InputError(f"'{where}' is damaged or not this bundle's manifest: {what}; export the bundle again")


def check_manifest(manifest: object, where: Path) -> dict:
    """The manifest, checked to hold what the runner reads, of the right types."""
    if not isinstance(manifest, dict):
        raise _damaged(where, f"it holds a JSON {type(manifest).__name__}, not an object")

    def whole(value: object) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    def number(value: object) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

    required = {
        "step": (lambda v: isinstance(v, str) and v not in ("", ".", "..") and Path(v).name == v, "a file name in the bundle"),
        "state_inputs": (lambda v: isinstance(v, list) and all(isinstance(n, str) for n in v), "a list of names"),
        "batch_size": (lambda v: whole(v) and v >= 1, "a whole number >= 1"),
        "x_shape": (lambda v: isinstance(v, list) and len(v) >= 1 and all(whole(d) and d >= 1 for d in v), "a list of sizes"),
        "x_dtype": (lambda v: isinstance(v, str) and v in ("float16", "float32", "float64"), "float16, float32 or float64"),
        "lr": (lambda v: number(v) and v > 0, "a positive number"),
    }
    optional = {
        "num_classes": (lambda v: whole(v) and v >= 1, "a whole number >= 1"),
        "x_abs_max": (lambda v: number(v) and v >= 0, "a number >= 0"),
    }
    for key, (fits, kind) in required.items():
        if key not in manifest:
            raise _damaged(where, f"'{key}' is missing")
        if not fits(manifest[key]):
            raise _damaged(where, f"'{key}' is not {kind}")
    for key, (fits, kind) in optional.items():
        if manifest.get(key) is not None and not fits(manifest[key]):
            raise _damaged(where, f"'{key}' is not {kind}")
    if manifest["x_shape"][0] != manifest["batch_size"]:
        raise _damaged(where, f"'x_shape' {manifest['x_shape']} does not start with the batch size {manifest['batch_size']}")
    return manifest


_ONNX_TYPES = {"tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16, "tensor(int64)": np.int64, "tensor(int32)": np.int32}


def open_step(bundle: Path, manifest: dict):
    """An onnxruntime session of the bundle's step graph, checked to take the manifest's state,
    x, y and lr; InputError naming the file when it is missing, damaged or another graph."""
    path = bundle / manifest["step"]
    if not path.is_file():
        raise InputError(f"step graph '{path}' is missing; export the bundle again")
    try:
        session = ort.InferenceSession(str(path), providers=providers())
    except Exception as error:  # onnxruntime's InvalidProtobuf, Fail, ... on a truncated or damaged file
        text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise InputError(f"step graph '{path}' is damaged or not an ONNX graph ({type(error).__name__}: {text[:200]}); export the bundle again") from None
    inputs = [i.name for i in session.get_inputs()]
    expected = [*manifest["state_inputs"], "x", "y", "lr"]
    if sorted(inputs) != sorted(expected) or len(session.get_outputs()) != len(manifest["state_inputs"]) + 1:
        raise InputError(f"step graph '{path}' does not match '{bundle / 'manifest.json'}' (other inputs or outputs); export the bundle again")
    return session


def check_state(state: dict[str, np.ndarray], names: list[str], where: Path, session=None) -> None:
    """Every state input the step needs is present, of the graph's shape and type, and finite."""
    missing = [n for n in names if n not in state]
    if missing:
        raise InputError(f"state '{where}' lacks {', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}; is it this bundle's?")
    declared = {i.name: i for i in session.get_inputs()} if session is not None else {}
    for name in names:
        array, spec = state[name], declared.get(name)
        dtype = _ONNX_TYPES.get(spec.type) if spec is not None else None
        if dtype is not None and array.dtype != dtype:
            raise InputError(f"state '{where}': {name} is {array.dtype}, the step takes {np.dtype(dtype)}; is it this bundle's?")
        if spec is not None and all(isinstance(d, int) for d in spec.shape) and tuple(array.shape) != tuple(spec.shape):
            raise InputError(f"state '{where}': {name} has shape {tuple(array.shape)}, the step takes {tuple(spec.shape)}; is it this bundle's?")
        if not (np.issubdtype(array.dtype, np.number) and not np.issubdtype(array.dtype, np.complexfloating)):
            raise InputError(f"state '{where}': {name} holds {array.dtype}, not real numbers; is it this bundle's?")
    bad = [n for n in names if not np.isfinite(state[n]).all()]
    if bad:
        raise InputError(f"state '{where}' holds NaN or Inf in {', '.join(bad[:3])}; start from the bundle's initial_state.npz")


def train(bundle: Path, steps: int, lr: float | None = None, data: Path | None = None, state: Path | None = None) -> tuple[dict, list[float]]:
    """Run ``steps`` training steps; returns the final state and the losses. Raises InputError
    for bad input (before any step) and Diverged at the first step whose loss or new state
    holds NaN or Inf."""
    check_settings(steps, lr)
    manifest_path = bundle / "manifest.json"
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as error:
        raise InputError(f"'{manifest_path}' is missing or damaged ({error})") from None
    manifest = check_manifest(manifest, manifest_path)
    state_path = state or bundle / "state.npz"
    data_path = data or bundle / "data.npz"
    names = manifest["state_inputs"]
    session = open_step(bundle, manifest)
    current = load_arrays(state_path, "state")
    check_state(current, names, state_path, session)
    x, y = check_data(load_arrays(data_path, "data"), manifest, data_path)
    batch = manifest["batch_size"]
    rate = np.array(manifest["lr"] if lr is None else lr, dtype=manifest["x_dtype"])
    losses: list[float] = []
    for step in range(steps):
        start = (step * batch) % (len(y) - batch + 1)
        feeds = {name: current[name] for name in names}
        feeds.update(x=x[start : start + batch], y=y[start : start + batch], lr=rate)
        try:
            outputs = session.run(None, feeds)
        except Exception as error:  # onnxruntime's InvalidArgument, Fail, ...: a graph that does not run as declared
            text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise InputError(f"step {step + 1}: onnxruntime could not run '{bundle / manifest['step']}' ({text[:200]}); export the bundle again") from None
        loss = float(outputs[-1])
        if not all(np.isfinite(o).all() for o in outputs):
            raise Diverged(f"step {step + 1} produced NaN or Inf (loss {loss}); nothing was saved: lower --lr")
        if losses and loss > DIVERGENCE_FACTOR * max(losses[0], 1.0):
            raise Diverged(
                f"step {step + 1}: the loss {loss:.3g} exceeds {DIVERGENCE_FACTOR:g} times the first step's "
                f"({losses[0]:.3g}); the run diverged and nothing was saved: lower --lr"
            )
        current = dict(zip(names, outputs[:-1]))
        losses.append(loss)
    return current, losses


def _fsync_directory(directory: Path) -> None:
    if os.name == "posix":
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def save_state(path: Path, state: dict[str, np.ndarray]) -> None:
    """Write ``state`` to ``path`` atomically: PATH.<pid>.<random>.tmp (this writer's own), fsync,
    rename, fsync of the directory. A kill leaves the old file whole; a failure removes the
    temporary file and leaves the old file."""
    buffer = io.BytesIO()
    np.savez(buffer, **state)
    view = buffer.getbuffer()
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")  # this writer's own name
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
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


def check_out(out: Path, bundle: Path, data: Path | None) -> None:
    """--out names a file in an existing directory, and neither a file of the bundle (other than
    state.npz) nor the data file."""
    if out.is_dir() or not out.parent.is_dir():
        raise InputError(f"--out '{out}' must be a file in an existing directory")
    target = out.resolve()
    if target == (bundle / "initial_state.npz").resolve():
        raise InputError("--out must not be initial_state.npz: that file keeps the bundle's starting point")
    own = [name for name in BUNDLE_FILES if target == (bundle / name).resolve()]
    if own:
        raise InputError(f"--out must not be the bundle's {own[0]}: give state.npz (the default) or a file of your own")
    if data is not None and target == data.resolve():
        raise InputError(f"--out must not be the data file '{data}'")


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
        check_out(out, bundle, args.data)
        lock = BundleLock(bundle)
        try:
            lock.__enter__()  # one writer per bundle: a second runner or an export is refused
        except ReadOnly:
            if out.resolve().parent == bundle:
                raise
            lock = None  # a read-only bundle, the state saved elsewhere: nothing here can be written, by anyone
        try:
            if lock is not None:
                for name in ("state.npz", "initial_state.npz"):
                    for leftover in temporaries(bundle / name):  # left by a killed writer (this one holds the bundle)
                        leftover.unlink(missing_ok=True)
            state, losses = train(bundle, args.steps, args.lr, args.data, args.state)
            for step, loss in enumerate(losses, 1):
                print(f"step {step}: loss {loss:.6f}")
            initial = bundle / "initial_state.npz"
            if lock is not None and not initial.exists() and (bundle / "state.npz").exists():  # a bundle from before initial_state.npz
                save_state(initial, load_arrays(bundle / "state.npz", "state"))
            save_state(out, state)
        finally:
            if lock is not None:
                lock.__exit__(None, None, None)
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
