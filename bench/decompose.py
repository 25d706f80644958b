"""The decomposition alone: this checkout's hosvd (and syncfree_hosvd) against another revision's.

    python bench/decompose.py [--against REV] [--device cpu|cuda] [--threads N] [--write]

For each layer shape of bench/layers.py, x = relu(avg_pool3x3(randn)) (batch 32 on CPU, 128 on
CUDA) is factorised by ``hosvd(x, eps)`` of this checkout and, with ``--against``, by the
``hosvd`` of actcomp/linalg/decompose.py (actcomp/decompose.py before the layout change) at git revision REV (loaded from ``git show``, so the rest of
the package is this checkout's), alternating in rounds; ``syncfree_hosvd`` is timed in its
steady state on a fresh batch every call. Medians, ranks and the bytes of the factors. This
separates the decomposition (actcomp/linalg) from the layer's convolutions and its
weight gradient (actcomp/kernels), which bench/layers.py times together.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
# The repository root first, so that this checkout's actcomp is measured (not an installed one).
sys.path[:0] = [str(ROOT), str(Path(__file__).resolve().parent)]
from actcomp.linalg.decompose import hosvd  # noqa: E402
from actcomp.linalg.syncfree import SyncFreeState, syncfree_hosvd  # noqa: E402
from common import interleaved_medians, machine, markdown_table, publish  # noqa: E402
from layers import SHAPES, smooth_input  # noqa: E402


def baseline_hosvd(rev: str):
    """``hosvd`` of the decomposition module at git revision ``rev``, importing this checkout's
    other modules (an older revision's imports of moved modules are mapped to their new place)."""
    for path in ("actcomp/linalg/decompose.py", "actcomp/decompose.py"):
        shown = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:{path}"], capture_output=True, text=True)
        if shown.returncode == 0:
            break
    else:
        raise SystemExit(f"--against {rev}: no decomposition module at that revision")
    source = shown.stdout.replace("from actcomp.factors import", "from actcomp.linalg.factors import")
    module = types.ModuleType(f"actcomp_decompose_{rev}")
    sys.modules[module.__name__] = module  # dataclasses look their module up there
    exec(compile(source, f"{rev}:{path}", "exec"), module.__dict__)
    return module.hosvd


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=None, help="default 32 on CPU, 128 on CUDA")
    parser.add_argument("--against", default=None, help="git revision whose hosvd to time as well")
    parser.add_argument("--eps", type=float, default=0.8)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--per-round", type=int, default=4)
    parser.add_argument("--write", action="store_true", help="update BENCHMARKS.md")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    batch = args.batch or (128 if device.type == "cuda" else 32)
    old = baseline_hosvd(args.against) if args.against else None
    torch.manual_seed(0)
    rows = []
    for name, (c_in, _, _, _, size) in SHAPES.items():
        x = smooth_input(batch, c_in, size, device).detach()
        batches = [smooth_input(batch, c_in, size, device).detach() for _ in range(4)]
        state = SyncFreeState()
        calls = {"n": 0}

        def syncfree() -> None:
            calls["n"] += 1
            syncfree_hosvd(batches[calls["n"] % 4], args.eps, state)

        fns = {"hosvd": lambda: hosvd(x, args.eps), "syncfree": syncfree}
        if old is not None:
            fns["old"] = lambda: old(x, args.eps)
        medians = interleaved_medians(fns, device, args.rounds, args.per_round)
        new = hosvd(x, args.eps)
        energy = float(x.double().pow(2).sum())
        kept = lambda t: f"{float(t.core.double().pow(2).sum()) / energy:.3f}"  # noqa: E731  ||S||^2 / ||X||^2
        row = [name, f"{medians['hosvd']:.2f}"]
        if old is not None:
            before = old(x, args.eps)
            row += [f"{medians['old']:.2f}", f"**{medians['old'] / medians['hosvd']:.2f}**", str(before.ranks), f"{before.nbytes / 2**20:.3f}", kept(before)]
        row += [str(new.ranks), f"{new.nbytes / 2**20:.3f}", kept(new), f"{medians['syncfree']:.2f}", str(state.capacities)]
        rows.append(row)
        print(" | ".join(row), flush=True)
    header = ["layer input", "hosvd ms"]
    if old is not None:
        header += [f"{args.against} hosvd ms", "speed-up", f"{args.against} ranks", f"{args.against} MiB", f"{args.against} energy kept"]
    header += ["ranks", "MiB", "energy kept", "syncfree ms", "syncfree capacities"]
    threads = f" --threads {args.threads}" if args.threads else ""
    against = f" --against {args.against}" if args.against else ""
    command = f"python bench/decompose.py --device {device.type} --batch {batch}{against} --eps {args.eps}{threads} --rounds {args.rounds} --per-round {args.per_round}"
    text = (
        f"## Decomposition alone, {device.type}, batch {batch}, eps {args.eps}{f', {args.threads} thread' if args.threads else ''}\n\n"
        f"Machine: {machine(device)}. Command: `{command}`. Medians of {args.rounds * args.per_round} calls each, "
        "alternating; syncfree in its steady state on a fresh batch every call. MiB: the factors' bytes; "
        "energy kept: ||S||^2 / ||X||^2 of the core.\n\n"
        f"{markdown_table(header, rows)}\n"
    )
    publish(f"decompose-{device.type}" + (f"-{args.threads}thread" if args.threads else ""), text, args.write)


if __name__ == "__main__":
    main()
