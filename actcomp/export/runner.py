"""Fine-tune on a device with onnxruntime and numpy only (no PyTorch): the bundle's runner.

    python runner.py [--steps 20] [--lr 0.05] [--data data.npz] [--state state.npz] [--out state.npz]

Reads manifest.json beside it, runs the exported training step (step.onnx) with onnxruntime's
CUDA provider where the installed build has one (Jetson) and the CPU otherwise, on consecutive
batches of the data (x, y arrays in an .npz), feeding each step's new weights, buffers and
subspaces to the next (fresh output arrays: no buffer is written while it is read), prints the
loss of every step and saves the final state. This file is copied into every bundle.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort


def providers() -> list[str]:
    """CUDA (a Jetson's GPU) when this onnxruntime build has it, else the CPU."""
    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


def train(bundle: Path, steps: int, lr: float | None = None, data: Path | None = None, state: Path | None = None) -> tuple[dict, list[float]]:
    """Run ``steps`` training steps; returns the final state and the losses."""
    manifest = json.loads((bundle / "manifest.json").read_text())
    session = ort.InferenceSession(str(bundle / manifest["step"]), providers=providers())
    current = dict(np.load(state or bundle / "state.npz"))
    arrays = np.load(data or bundle / "data.npz")
    x, y = arrays["x"].astype(manifest["x_dtype"]), arrays["y"].astype(np.int64)
    batch = manifest["batch_size"]
    if len(y) < batch:
        raise ValueError(f"the data holds {len(y)} samples; the step's static batch is {batch}")
    rate = np.array(manifest["lr"] if lr is None else lr, dtype=manifest["x_dtype"])
    names = manifest["state_inputs"]
    losses = []
    for step in range(steps):
        start = (step * batch) % (len(y) - batch + 1)
        feeds = {name: current[name] for name in names}
        feeds.update(x=x[start : start + batch], y=y[start : start + batch], lr=rate)
        outputs = session.run(None, feeds)
        current = dict(zip(names, outputs[:-1]))
        losses.append(float(outputs[-1]))
    return current, losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--data", type=Path)
    parser.add_argument("--state", type=Path)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    bundle = Path(__file__).resolve().parent
    state, losses = train(bundle, args.steps, args.lr, args.data, args.state)
    for step, loss in enumerate(losses, 1):
        print(f"step {step}: loss {loss:.6f}")
    out = args.out or bundle / "state.npz"
    np.savez(out, **state)
    print(f"saved {out}")


if __name__ == "__main__":
    main()
