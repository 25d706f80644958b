"""The ``actcomp`` command."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from actcomp.config import CompressionConfig


def _demo(args: argparse.Namespace) -> int:
    from actcomp.demo import format_table, rows_as_dicts, run_demo

    methods = tuple(m.strip() for m in args.methods.split(","))
    for method in methods:
        CompressionConfig(method, args.eps)  # a bad method or eps fails here, before any training
    if args.layers < 1:
        raise ValueError(f"--layers must be at least 1, got {args.layers}")
    rows = run_demo(
        layers=args.layers,
        eps=args.eps,
        methods=methods,
        pretrain_epochs=args.pretrain_epochs,
        finetune_epochs=args.epochs,
        batch_size=args.batch_size,
        seed=args.seed,
        progress=not args.no_progress,
    )
    print("Fine-tuning TinyMobileNet on digits 5-9 after pretraining on 0-4 (scikit-learn digits, 32x32)")
    print(format_table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows_as_dicts(rows), indent=2))
        print(f"wrote {args.json}")
    return 0


def _devices(args: argparse.Namespace) -> int:
    from actcomp.devices import list_devices, load_device
    from actcomp.memory import format_bytes

    devices = [load_device(args.file)] if args.file else list_devices()
    header = ("name", "kind", "RAM", "flash", "reserve", "budget", "peak", "title")
    rows = [
        (
            d.name, d.kind, format_bytes(d.ram_bytes), format_bytes(d.flash_bytes), format_bytes(d.reserve_bytes),
            format_bytes(d.budget_bytes), f"{d.peak_ops_per_s / 1e9:g} G/s {d.peak_precision}", d.title,
        )
        for d in devices
    ]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    print(fmt.format(*header))
    for row in rows:
        print(fmt.format(*row))
    if args.sources:
        for d in devices:
            print(f"{d.name}: {d.source}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="actcomp",
        description="Fine-tune PyTorch models on devices by keeping low-rank factors of activations.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo",
        help="transfer a small CNN from digits 0-4 to 5-9, plain vs compressed (offline, ~1 min on 2 cores)",
        description="Pretrain a TinyMobileNet on scikit-learn's digits 0-4, fine-tune its last N "
        "layers on digits 5-9 with each method, and print bytes kept, accuracy and step time.",
    )
    demo.add_argument("--layers", type=int, default=4, help="fine-tune the last N Conv/Linear layers (default 4)")
    demo.add_argument("--eps", type=float, default=0.8, help="explained variance kept, in (0, 1] (default 0.8)")
    demo.add_argument("--methods", default="none,hosvd,svd", help="comma-separated methods (default none,hosvd,svd)")
    demo.add_argument("--epochs", type=int, default=6, help="fine-tuning epochs (default 6)")
    demo.add_argument("--pretrain-epochs", type=int, default=6, help="pretraining epochs (default 6)")
    demo.add_argument("--batch-size", type=int, default=64)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")
    demo.set_defaults(run=_demo)

    devices = sub.add_parser("devices", help="list the device profiles (RAM, flash, budget, peak compute)")
    devices.add_argument("--file", metavar="PATH", help="check and show your own profile file instead")
    devices.add_argument("--sources", action="store_true", help="also print each profile's datasheet source")
    devices.set_defaults(run=_devices)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point: errors in the user's input are one line on stderr and exit code 2."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except ValueError as error:
        print(f"actcomp {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
