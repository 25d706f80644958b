"""The README's figure: device total against step time and against accuracy, from BENCHMARKS.md.

    python bench/plot_frontier.py [--alternatives alternatives] [--quality quality,quality-unbiased,quality-neighbours] [--out docs/frontier.png]

Reads the tables that bench/alternatives.py and bench/quality.py wrote into BENCHMARKS.md (no
measurement of its own, so the figure shows exactly the published numbers) and draws two
panels: left, for each model of the ``--alternatives`` section, every variant's device total
against its step time, both relative to plain autograd (exact levers as circles, compressed
variants as crosses, fit's choices as stars); right, from the ``--quality`` sections (a
variant measured again in a later section shows its later row), test accuracy on the demo task
(mean over seeds, bars from the lowest to the highest seed) against the device total relative
to plain. Needs matplotlib (the ``app`` extra).
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent.parent / "BENCHMARKS.md"


def section(text: str, key: str) -> str:
    """The text between the markers of section ``key``."""
    found = re.search(re.escape(f"<!-- begin {key} -->") + "(.*?)" + re.escape(f"<!-- end {key} -->"), text, re.S)
    if found is None:
        raise SystemExit(f"BENCHMARKS.md has no section {key!r}: run the bench script that writes it first")
    return found[1]


def tables(text: str) -> list[tuple[str, list[dict[str, str]]]]:
    """Each markdown table with the heading above it: (heading, rows as dicts by column)."""
    out, heading = [], ""
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("#"):
            heading = line.lstrip("#").strip()
        if line.startswith("|") and i + 1 < len(lines) and lines[i + 1].startswith("|---"):
            header = [c.strip() for c in line.strip("|").split("|")]
            rows = []
            i += 2
            while i < len(lines) and lines[i].startswith("|"):
                cells = [c.strip().strip("*") for c in lines[i].strip("|").split("|")]
                rows.append(dict(zip(header, cells)))
                i += 1
            out.append((heading, rows))
            continue
        i += 1
    return out


EXPERIMENTS = ("mode only", "batch mode kept", "truncated BatchNorm", "SGD momentum")


def number(cell: str) -> float | None:
    found = re.match(r"-?[0-9.]+", cell.replace("x", ""))
    return float(found[0]) if found else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--alternatives", default="alternatives", help="BENCHMARKS.md section of bench/alternatives.py")
    parser.add_argument("--quality", default="quality,quality-unbiased,quality-neighbours",
                        help="comma-separated BENCHMARKS.md sections of bench/quality.py (a later section's row replaces an earlier one's)")
    parser.add_argument("--out", default="docs/frontier.png")
    args = parser.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    text = BENCHMARKS.read_text()
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for colour, (heading, rows) in zip(colours, tables(section(text, args.alternatives))):
        model = heading.split(",")[0]
        for row in rows:
            total, time = number(row.get("total/plain", "")), number(row.get("time/plain", ""))
            if total is None or time is None:
                continue  # an infeasible fit: no figures
            variant = row["variant"]
            marker = "*" if variant.startswith("fit") else ("x" if "hosvd" in variant else "o")
            left.scatter(time, total, marker=marker, color=colour, s=60 if marker == "*" else 30)
        left.scatter([], [], color=colour, label=model)
    left.scatter([], [], marker="o", color="grey", label="exact levers")
    left.scatter([], [], marker="x", color="grey", label="compression (hosvd)")
    left.scatter([], [], marker="*", color="grey", label="fit's choice")
    left.set(xlabel="step time / plain", ylabel="device total / plain", title="Memory against time (one step, every layer trained)")
    left.legend(fontsize=8)
    left.grid(alpha=0.3)
    latest: dict[str, dict[str, str]] = {}  # variant -> row; a later section's row replaces an earlier one's
    for key in args.quality.split(","):
        for row in tables(section(text, key))[0][1]:
            latest[row["variant"]] = row
    for variant, row in latest.items():
        if any(tag in variant for tag in EXPERIMENTS):
            continue  # a benchmark's experiment (a cause, a neighbour policy), not a setting a user picks
        total = number(row.get("total / plain", ""))
        found = re.match(r"([0-9.]+)% \(([0-9.]+)-([0-9.]+)\)", row.get("test accuracy, mean (min-max)", ""))
        if total is None or not found:
            continue
        mean, low, high = (float(v) for v in found.groups())
        kind = "unbiased" if "unbiased" in variant else "compressed" if any(m in variant for m in ("svd", "asi")) else "exact"
        marker, colour = {"exact": ("o", colours[0]), "compressed": ("x", colours[1]), "unbiased": ("^", colours[2])}[kind]
        right.errorbar(total, mean, yerr=[[mean - low], [high - mean]], fmt=marker, capsize=3, color=colour)
        right.annotate(variant, (total, mean), fontsize=6, xytext=(3, 3), textcoords="offset points")
    for kind, (marker, colour) in {"exact levers": ("o", colours[0]), "truncating methods": ("x", colours[1]), "unbiased methods": ("^", colours[2])}.items():
        right.errorbar([], [], fmt=marker, color=colour, label=kind)
    right.legend(fontsize=8, loc="lower right")
    right.set(xscale="log", xlabel="device total / plain (log)", ylabel="test accuracy, % (mean, min-max over seeds)",
              title="Accuracy against memory (demo task, every layer trained)")
    right.grid(alpha=0.3)
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
