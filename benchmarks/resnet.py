"""ResNet benchmark (paper §5, Fig. 2 and 4): time per input pair and peak memory of torchvision ResNets.

Models: torchvision ``resnet18/34/50`` and ``wide_resnet50_2`` (random init, eval mode, ``num_classes=O``), random
inputs ``Tensor[N, 3, R, R]`` at a CPU-friendly resolution and at 224×224, float32, ``trace_axes=()`` (the full
``O × O`` block per pair). Methods: torchntk's Jacobian contraction (JC), NTK-vector products (NVP), structured
derivatives (SD) and ``auto``. Reported: median time / N² (time per input pair; the paper reports the best N), the
peak RSS of one warm call measured in a child process, and the model's conversion time to JAX (SD). Points beyond
the memory limit or the time budget are missing, as in the paper. ``--full-ntk`` answers one question with a
larger budget: which method computes the full 1000×1000 NTK of resnet18 at 224×224 on this machine at all.

Usage::

    python benchmarks/resnet.py                 # the committed grid
    python benchmarks/resnet.py --quick         # resnet18 at 32×32, O 1/10/1000, N 1/2
    python benchmarks/resnet.py --full-ntk      # resnet18, 224×224, O=1000, N=1, every method, 600 s budget
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import _common as c

MODELS = ("resnet18", "resnet34", "resnet50", "wide_resnet50_2")


def build(spec: dict) -> tuple:
    import torch
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.get_model(spec["model"], weights=None, num_classes=spec["O"]).eval()
    generator = torch.Generator().manual_seed(1)
    shape = (spec["N"], 3, spec["R"], spec["R"])
    return model, torch.randn(shape, generator=generator), torch.randn(shape, generator=generator)


def probe_target(spec: dict, budget_s: float) -> dict:
    """Runs in the child: one method on one case (see :func:`_common.measure_calls`)."""
    model, x1, x2 = build(spec)
    prepare, call = c.torchntk_case(model, x1, x2, spec["method"], spec["max_memory"])
    result = c.measure_calls(prepare, call, budget_s, warm=not spec.get("single_call"))
    result["params"] = sum(p.numel() for p in model.parameters())
    return result


def cases(args: argparse.Namespace) -> list[dict]:
    out = []
    for resolution, models in ((args.low_res, args.models), (224, args.models_224)):
        for model in models:
            for o in args.outputs if resolution != 224 else args.outputs_224:
                for n in sorted(args.batches if resolution != 224 else args.batches_224):
                    out.append({"model": model, "R": resolution, "O": o, "N": n})
    return out


def run(args: argparse.Namespace) -> dict:
    limit = c.memory_limit_bytes(args.memory_gb)
    over_n = c.Budget(args.budget_s, limit)  # along N for one (model, R, O, method)
    over_models = c.Budget(args.budget_s, limit)  # along model size for one (R, O, N, method)
    points = []
    for spec in cases(args):
        spec["max_memory"] = args.max_memory_gb * c.GB if args.max_memory_gb else limit
        probes, params = {}, None
        for method in args.methods:
            key_n, key_m = (spec["model"], spec["R"], spec["O"], method), (spec["R"], spec["O"], spec["N"], method)
            size = MODELS.index(spec["model"]) + 1
            reason = over_n.skip_reason(key_n, spec["N"]) or over_models.skip_reason(key_m, size, exponent=1)
            if reason:
                probes[method] = {"status": reason}
                continue
            probes[method] = c.probe(
                probe_target,
                {**spec, "method": method, "single_call": args.full_ntk},
                memory_limit=limit,
                timeout_s=args.timeout_s or 6 * args.budget_s + 180,
                budget_s=args.budget_s,
            )
            params = probes[method].get("params", params)
            over_n.record(key_n, spec["N"], probes[method])
            over_models.record(key_m, size, probes[method])
        ok = [m for m in args.methods if probes[m]["status"] == "ok"]
        timings = {}
        if ok and not args.no_timing:
            model, x1, x2 = build(spec)
            calls = {m: c.torchntk_case(model, x1, x2, m, limit)[1] for m in ok}
            timings = c.timed_side_by_side(calls, {m: probes[m]["warm_call_s"] for m in ok})
            c.forget_compiled()
        for method in args.methods:
            point = {k: v for k, v in spec.items() if k != "max_memory"}
            point.update(method=method, method_short=c.SHORT[method], **probes[method])
            point["params"] = params
            point.update(timings.get(method, {}))
            single = point.get("warm_call_s") or point.get("first_call_s")
            seconds = point.get("median_s", single if point["status"] == "ok" else None)
            point["time_per_pair_s"] = seconds / spec["N"] ** 2 if seconds is not None else None
            point["peak_gb"] = point["peak_bytes"] / c.GB if point["status"] == "ok" else None
            points.append(point)
        cells = "  ".join(
            f"{c.SHORT[m]} {c.point_label(p)}" for m, p in zip(args.methods, points[-len(args.methods) :], strict=True)
        )
        print(f"{spec['model']:16s} R={spec['R']:3d} O={spec['O']:4d} N={spec['N']}: {cells} (ms)", flush=True)
    return {"points": points, "memory_limit_bytes": limit}


def table(points: list[dict], methods: list[str]) -> str:
    """Markdown: ms per input pair (peak GB) per case and method, and SD's conversion time."""
    keys = list(dict.fromkeys((p["model"], p["R"], p["O"], p["N"]) for p in points))
    index = {(p["model"], p["R"], p["O"], p["N"], p["method"]): p for p in points}
    header = ["model", "R", "O", "N"] + [f"{c.SHORT[m]} ms/pair (GB)" for m in methods] + ["SD conversion s"]
    rows = []
    for key in keys:
        cells = []
        for m in methods:
            p = index[(*key, m)]
            label = c.fmt_ms(p["time_per_pair_s"]) if p.get("time_per_pair_s") else c.point_label(p)
            single = p.get("warm_call_s") or p.get("first_call_s")
            if p["status"] == "over_budget" and single:
                label += f" (1 call: {single:.0f} s)"
            elif p["status"] == "error" and "too small for even one tile" in p.get("error", ""):
                needed = re.search(r"needs about ([\d,]+) bytes", p["error"])
                label = f"refused (needs {int(needed.group(1).replace(',', '')) / c.GB:.0f} GB)" if needed else label
            cells.append(label + (f" ({p['peak_gb']:.1f})" if p.get("peak_gb") else ""))
        conversion = index.get((*key, "structured_derivatives"), {}).get("conversion_s")
        rows.append([*key, *cells, f"{conversion:.1f}" if conversion else "—"])
    return c.markdown_table(header, rows)


def plot(points: list[dict], path: Path) -> None:
    """Paper Fig. 2 style: best time per pair over N against the model's parameter count, per (R, O) panel."""
    best: dict[tuple, dict] = {}
    for p in points:
        single = p.get("warm_call_s") or p.get("first_call_s")
        if p["status"] == "over_budget" and single and p["params"]:  # one call (the first includes compilation)
            p = dict(p, method_short=p["method_short"] + " (1 call, > budget)", time_per_pair_s=single / p["N"] ** 2)
        key = (p["model"], p["R"], p["O"], p["method_short"])
        if p.get("time_per_pair_s") and (key not in best or p["time_per_pair_s"] < best[key]["time_per_pair_s"]):
            best[key] = dict(p, params_m=p["params"] / 1e6)
    if best:
        c.loglog_panels(
            list(best.values()),
            x="params_m",
            y="time_per_pair_s",
            panel="O",
            row="R",
            series="method_short",
            path=path,
            title="torchvision ResNets: time per input pair (s), best over N; missing = refused / OOM / budget",
            xlabel="parameters (millions)",
            ylabel="s / N²",
        )


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS, help="at --low-res")
    parser.add_argument("--low-res", type=int, default=32, help="the CPU-friendly resolution")
    parser.add_argument("--outputs", type=int, nargs="+", default=[1, 10, 1000])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--models-224", nargs="*", default=["resnet18", "resnet50"], choices=MODELS)
    parser.add_argument("--outputs-224", type=int, nargs="+", default=[1, 10])
    parser.add_argument("--batches-224", type=int, nargs="+", default=[1])
    parser.add_argument("--methods", nargs="+", default=list(c.TORCHNTK_METHODS), choices=c.TORCHNTK_METHODS)
    c.add_run_options(parser, budget_help="skip a method once one call exceeds this", out=None)
    parser.add_argument("--timeout-s", type=float, default=None, help="kill a child after this (default 6×budget)")
    parser.add_argument(
        "--max-memory-gb",
        type=float,
        default=None,
        help="torchntk's max_memory (default: the memory limit); larger lets a method try beyond its own estimate, "
        "the child is still killed at the memory limit",
    )
    parser.add_argument("--no-timing", action="store_true", help="only the child's single warm call")
    parser.add_argument("--quick", action="store_true", help="resnet18 at 32×32, O 1/10/1000, N 1/2")
    parser.add_argument("--full-ntk", action="store_true", help="resnet18 224×224 O=1000 N=1, 600 s budget")
    args = parser.parse_args(argv)
    if args.quick:
        args.models, args.batches, args.models_224 = ["resnet18"], [1, 2], []
    if args.full_ntk:
        args.models, args.models_224, args.outputs_224, args.batches_224 = [], ["resnet18"], [1000], [1]
        args.budget_s, args.timeout_s, args.no_timing = 600.0, args.timeout_s or 600.0, True
    if args.smoke:
        args.models, args.outputs, args.batches, args.models_224, args.low_res = ["resnet18"], [2], [1], [], 16
    name = "resnet_full_ntk" if args.full_ntk else "resnet"
    args.out = args.out or c.RESULTS / f"{name}.json"
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    needs_converter = any(m in ("structured_derivatives", "auto") for m in args.methods)
    name = "resnet_full_ntk" if args.full_ntk else "resnet"
    payload = c.run_benchmark(
        name, __doc__, args, run, lambda points: table(points, args.methods), converter_needed=needs_converter
    )
    if not args.full_ntk:
        plot(payload["points"], args.out.with_suffix(".png"))
    return payload


if __name__ == "__main__":
    main(sys.argv[1:])
