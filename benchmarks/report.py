"""Render the headline tables of ``benchmarks/README.md`` from the committed JSON results (no measuring).

Prints: the anchor table (``results/anchors.json``), FCN time per NTK entry at the largest N per O and the largest
width each method reached (``results/fcn.json``), the ResNet table (``results/resnet.json``) and the full
1000×1000 resnet18 NTK check (``results/resnet_full_ntk.json``), each with its load average.

Usage: ``python benchmarks/report.py [--results DIR]``
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import _common as c
import anchors
import fcn
import resnet


def load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def header(data: dict) -> str:
    m = data["machine"]
    return (
        f"_{m.get('Model name')}, {m.get('CPU(s)')} cores, {m['memory_total_gb']} GB; torch {m.get('torch')}, jax "
        f"{m.get('jax')}; load average before/after: {data['load_average_before']} / {data['load_average_after']}; "
        f"{data['wall_s'] / 60:.1f} min._"
    )


def micro(seconds: float | None) -> str:
    if not seconds:
        return "—"
    us = 1e6 * seconds
    return f"{us:,.0f}" if us >= 100 else f"{us:.3g}"


def fcn_summary(data: dict) -> str:
    points = data["points"]
    methods = list(dict.fromkeys(p["method"] for p in points))
    widths = sorted({p["W"] for p in points})
    n = max(p["N"] for p in points)
    rows = []
    for depth in sorted({p["depth"] for p in points}, reverse=True):
        for o in sorted({p["O"] for p in points}):
            for m in methods:
                got = {p["W"]: p for p in points if (p["depth"], p["N"], p["O"], p["method"]) == (depth, n, o, m)}
                cells = [micro(got[w]["time_per_entry_s"]) if w in got else "—" for w in widths]
                reached = [w for w in widths if w in got and got[w]["time_per_entry_s"]]
                rows.append([depth, n, o, c.SHORT[m], *cells, max(reached) if reached else "—"])
    budget = data["config"]["budget_s"]
    head = ["depth", "N", "O", "method"] + [f"W={w}" for w in widths] + [f"largest W run ({budget:g} s budget)"]
    ooms = sum(p["status"] == "oom" for p in points)
    note = f"Time per NTK entry (µs), median, at N={n}; — = over the {budget:g} s time budget ({ooms} points OOM):"
    return note + "\n\n" + c.markdown_table(head, rows)


def anchors_table(data: dict) -> str:
    config = data["config"]
    return anchors.table(data["points"], config["widths"], config["outputs"], config["rows"])


def full_ntk(data: dict) -> str:
    rows = []
    for p in data["points"]:
        if p["status"] == "ok":
            outcome = f"computed: {p['first_call_s']:.0f} s (first call, incl. compile), peak {p['peak_gb']:.1f} GB"
        else:
            outcome = f"{p['status']}: {p.get('error', '')[:160]}"
        max_memory = data["config"].get("max_memory_gb")
        setting = f"max_memory={max_memory:g} GB" if max_memory else "default (max_memory = the memory limit)"
        rows.append([c.SHORT[p["method"]], setting, outcome])
    header = ["method", "torchntk setting", "resnet18, 224×224, O=1000, N=1 (full 1000×1000 NTK)"]
    return c.markdown_table(header, rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=c.RESULTS)
    args = parser.parse_args(argv)
    sections = [
        ("anchors.json", "Anchors (FCN depth 3, N=8)", anchors_table),
        ("anchors_sd.json", "Structured derivatives head to head (FCN depth 3, N=8)", anchors_table),
        ("fcn.json", "FCN (paper Fig. 1 setting)", lambda d: fcn.table(d["points"], d["config"]["methods"])),
        ("fcn.json", "FCN summary", fcn_summary),
        ("resnet.json", "ResNets", lambda d: resnet.table(d["points"], d["config"]["methods"])),
        ("resnet_full_ntk.json", "Full 1000×1000 NTK of resnet18 at 224×224", full_ntk),
        ("resnet_full_ntk_sd.json", "The same, SD allowed past its own memory estimate", full_ntk),
    ]
    for name, title, render in sections:
        data = load(args.results / name)
        if data is None:
            print(f"## {title}\n\n(no {name} yet)\n")
            continue
        print(f"## {title}\n\n{header(data)}\n\n{render(data)}\n")


if __name__ == "__main__":
    main(sys.argv[1:])
