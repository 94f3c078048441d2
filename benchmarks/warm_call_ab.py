"""A/B of two checkouts: one warm call per (case, method), in alternating fresh processes, medians of 5 calls.

For changes to what every call pays (the per-call checks): ``python benchmarks/warm_call_ab.py --before <checkout>
--after <checkout> --out results/<name>.json`` runs each child with ``PYTHONPATH=<checkout>`` and a fresh
``TORCHNTK_CACHE_DIR``, before and after alternately (``--rounds`` times), and records each median with the
1-minute load average. The 2026-12-06 A/B of the checks' θ-sized passes is ``results/check_overhead_ab.json``.
``--warmups`` more calls before the timed ones reach a steady state (the per-call check moves to its optimised
program after a few calls).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CASES = {
    # the per-call checks' θ-sized work dominates: 38M parameters, one example, one output
    "fcn depth 10, W 2048, N 1, O 1": {"bench": "fcn", "depth": 10, "W": 2048, "O": 1, "N": 1, "in_dim": 3},
    # small θ: the checks' share is small (no regression wanted)
    "fcn depth 3, W 512, N 8, O 16": {"bench": "fcn", "depth": 3, "W": 512, "O": 16, "N": 8, "in_dim": 3},
    "resnet50 32x32, N 1, O 1": {"bench": "resnet", "model": "resnet50", "R": 32, "O": 1, "N": 1},
    "resnet18 32x32, N 1, O 1": {"bench": "resnet", "model": "resnet18", "R": 32, "O": 1, "N": 1},
}
METHODS = ("jacobian_contraction", "ntk_vector_products", "structured_derivatives")


def child(case: str, method: str, warmups: int) -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    import torch

    import torchntk

    torch.set_num_threads(2)
    spec = CASES[case]
    if spec["bench"] == "fcn":
        import fcn

        model, x1, x2 = fcn.build(spec)
    else:
        import resnet

        model, x1, x2 = resnet.build(spec)
    for _ in range(warmups):  # conversion and compilation (structured derivatives), then warm calls
        torchntk.ntk(model, x1, x2, implementation=method)
    times = []
    for _ in range(5):
        start = time.perf_counter()
        torchntk.ntk(model, x1, x2, implementation=method)
        times.append(time.perf_counter() - start)
    print("RESULT", json.dumps({"median_s": statistics.median(times), "times": times, "torchntk": torchntk.__file__}))


def run(checkout: str, case: str, method: str, warmups: int) -> dict:
    env = {**os.environ, "PYTHONPATH": checkout, "TORCHNTK_CACHE_DIR": tempfile.mkdtemp(prefix="torchntk-ab-")}
    out = subprocess.run(
        [sys.executable, __file__, "--child", case, method, "--warmups", str(warmups)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    result = json.loads(next(line for line in out.splitlines() if line.startswith("RESULT"))[7:])
    return {**result, "load_average": os.getloadavg()[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", nargs=2, metavar=("CASE", "METHOD"))
    parser.add_argument("--before")
    parser.add_argument("--after")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--warmups", type=int, default=2, help="calls before the timed ones (2: conversion, warm)")
    args = parser.parse_args()
    if args.child:
        child(*args.child, args.warmups)
        return
    from _common import machine, write_json

    rows = []
    for case in args.cases:
        for method in args.methods:
            for round_ in range(args.rounds):
                for label, checkout in (("before", args.before), ("after", args.after)):
                    result = run(str(Path(checkout).resolve()), case, method, args.warmups)
                    rows.append({"case": case, "method": method, "round": round_, "checkout": label, **result})
                    print(case, method, label, f"{result['median_s']:.3f} s", flush=True)
    summary = {}
    for case in args.cases:
        for method in args.methods:
            medians = {
                label: statistics.median(
                    r["median_s"] for r in rows if (r["case"], r["method"], r["checkout"]) == (case, method, label)
                )
                for label in ("before", "after")
            }
            summary[f"{case} / {method}"] = {**medians, "after/before": medians["after"] / medians["before"]}
    write_json(
        args.out,
        {"machine": machine(), "config": vars(args) | {"out": str(args.out)}, "summary": summary, "rows": rows},
    )
    for key, value in summary.items():
        print(f"{key}: {value['before']:.3f} -> {value['after']:.3f} s ({value['after/before']:.2f}x)")


if __name__ == "__main__":
    main()
