"""FCN benchmark (paper §4.1, Fig. 1 and 3, App. N): time per NTK entry and peak memory against width.

Model: ``depth`` hidden ReLU layers of width W, no bias, weight variance 1 in the NTK parameterisation (nt.stax's
defaults), inputs of size 3 (App. N), float32, ``trace_axes=()``: the kernel is ``Tensor[N, N, O, O]`` for
``x1, x2`` of N examples each. Methods: torchntk's Jacobian contraction (JC), NTK-vector products (NVP), structured
derivatives (SD) and ``auto``.

What is measured (see ``_common.py`` for the protocol): per (method, case) a child process gives the peak RSS of one
warm call, the RSS before it, and the conversion and first-call (compile) times; then the methods that fit the
memory limit and time budget are timed side by side in this process: median of ≥ 5 runs after a warm-up. The
figure shows median time / (N² O²) — time per NTK entry — against W, one panel per (N, O); missing points are
out-of-memory or over budget.

Usage::

    python benchmarks/fcn.py                # the committed grid (~10 min on 2 cores)
    python benchmarks/fcn.py --quick        # depth 3, W 64..256, O 1/16, N 1/8
    python benchmarks/fcn.py --widths 64 128 --outputs 16 --batches 8 --depths 3 --out /tmp/fcn.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import _common as c


def build(spec: dict) -> tuple:
    """The model and the two input batches of one case (same seed in the child and in the parent)."""
    import torch

    model = c.ntk_mlp(spec["in_dim"], spec["W"], spec["depth"], spec["O"])
    generator = torch.Generator().manual_seed(1)
    x1 = torch.randn(spec["N"], spec["in_dim"], generator=generator)
    x2 = torch.randn(spec["N"], spec["in_dim"], generator=generator)
    return model, x1, x2


def probe_target(spec: dict, budget_s: float) -> dict:
    """Runs in the child: one method on one case (see :func:`_common.measure_calls`)."""
    model, x1, x2 = build(spec)
    prepare, call = c.torchntk_case(model, x1, x2, spec["method"], spec["max_memory"])
    return c.measure_calls(prepare, call, budget_s)


def run_grid(args: argparse.Namespace) -> dict:
    limit = c.memory_limit_bytes(args.memory_gb)
    budget = c.Budget(args.budget_s, limit)
    points = []
    for depth in args.depths:
        for n in args.batches:
            for o in args.outputs:
                for width in sorted(args.widths):
                    spec = {"depth": depth, "W": width, "O": o, "N": n, "in_dim": args.in_dim, "max_memory": limit}
                    points += run_case(spec, args.methods, budget, limit, args)
    return {"points": points, "memory_limit_bytes": limit}


def run_case(spec: dict, methods: list[str], budget: c.Budget, limit: float, args: argparse.Namespace) -> list[dict]:
    """Probe every method on one case, then time those that passed side by side."""
    import torchntk

    probes = {}
    for method in methods:
        key = (spec["depth"], spec["N"], spec["O"], method)
        reason = budget.skip_reason(key, spec["W"])
        if reason:
            probes[method] = {"status": reason}
            continue
        probes[method] = c.probe(
            probe_target,
            {**spec, "method": method},
            memory_limit=limit,
            timeout_s=6 * args.budget_s + 120,
            budget_s=args.budget_s,
        )
        budget.record(key, spec["W"], probes[method])
    ok = [m for m in methods if probes[m]["status"] == "ok"]
    model, x1, x2 = build(spec)
    calls = {m: c.torchntk_case(model, x1, x2, m, limit)[1] for m in ok}
    timings = c.timed_side_by_side(calls, {m: probes[m]["warm_call_s"] for m in ok}) if ok else {}
    choice = torchntk.explain(model, x1, x2, max_memory=int(limit)).choice if "auto" in methods else None
    c.forget_compiled()
    entries = spec["N"] ** 2 * spec["O"] ** 2
    rows = []
    for method in methods:
        point = {k: v for k, v in spec.items() if k != "max_memory"}
        point.update(method=method, method_short=c.SHORT[method], **probes[method], **timings.get(method, {}))
        point["time_per_entry_s"] = point["median_s"] / entries if "median_s" in point else None
        point["peak_gb"] = point["peak_bytes"] / c.GB if point["status"] == "ok" else None
        if method == "auto":
            point["auto_choice"] = choice
        rows.append(point)
    cells = "  ".join(f"{c.SHORT[m]} {c.point_label(p)}" for m, p in zip(methods, rows, strict=True))
    print(f"depth={spec['depth']:2d} N={spec['N']:2d} O={spec['O']:3d} W={spec['W']:5d}: {cells} (ms)", flush=True)
    return rows


def table(points: list[dict], methods: list[str]) -> str:
    """Markdown: median ms (peak GB) per case and method."""
    cases = list(dict.fromkeys((p["depth"], p["N"], p["O"], p["W"]) for p in points))
    index = {(p["depth"], p["N"], p["O"], p["W"], p["method"]): p for p in points}
    header = ["depth", "N", "O", "W"] + [f"{c.SHORT[m]} ms (GB)" for m in methods] + ["auto picks"]
    rows = []
    for case in cases:
        cells = []
        for m in methods:
            p = index[(*case, m)]
            cells.append(c.point_label(p) + (f" ({p['peak_gb']:.2f})" if p.get("peak_gb") else ""))
        choice = index.get((*case, "auto"), {}).get("auto_choice")
        rows.append([*case, *cells, c.SHORT.get(choice, "—")])
    return c.markdown_table(header, rows)


def plots(points: list[dict], stem: Path) -> None:
    for depth in sorted({p["depth"] for p in points}):
        chosen = [p for p in points if p["depth"] == depth]
        figures = {
            "time": (
                "time_per_entry_s",
                "wall-clock time per NTK entry (s), CPU; missing = OOM / over budget",
                "s / (N² O²)",
            ),
            "memory": ("peak_gb", "peak RSS of one warm call (GB, incl. process baseline)", "peak GB"),
        }
        for suffix, (y, title, ylabel) in figures.items():
            c.loglog_panels(
                chosen,
                y=y,
                path=stem.with_name(f"{stem.name}_depth{depth}_{suffix}.png"),
                title=f"FCN depth {depth}: {title}",
                ylabel=ylabel,
                x="W",
                panel="O",
                row="N",
                series="method_short",
                xlabel="width W",
            )


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depths", type=int, nargs="+", default=[10, 3])
    parser.add_argument("--widths", type=int, nargs="+", default=[2**k for k in range(6, 12)])
    parser.add_argument("--outputs", type=int, nargs="+", default=[1, 16, 128])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 16])
    parser.add_argument("--methods", nargs="+", default=list(c.TORCHNTK_METHODS), choices=c.TORCHNTK_METHODS)
    parser.add_argument("--in-dim", type=int, default=3, help="input size (App. N: 3)")
    c.add_run_options(parser, budget_help="skip a method once one call exceeds this", out=c.RESULTS / "fcn.json")
    parser.add_argument("--quick", action="store_true", help="depth 3, W 64..256, O 1/16, N 1/8")
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.depths, args.widths, args.outputs, args.batches = [3], [64, 128, 256], [1, 16], [1, 8]
    if args.smoke:
        args.depths, args.widths, args.outputs, args.batches, args.budget_s = [2], [8], [2], [2], 30.0
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    needs_converter = any(m in ("structured_derivatives", "auto") for m in args.methods)
    payload = c.run_benchmark(
        "fcn", __doc__, args, run_grid, lambda points: table(points, args.methods), converter_needed=needs_converter
    )
    if not args.no_plot:
        plots(payload["points"], args.out.with_suffix(""))
    return payload


if __name__ == "__main__":
    main(sys.argv[1:])
