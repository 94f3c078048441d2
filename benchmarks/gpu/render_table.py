"""The README's GPU tables from a ``bench_gpu.py`` JSON, with the committed CPU figures of the same cases beside them.

Usage::

    python benchmarks/gpu/render_table.py benchmarks/results/gpu/gpu_check_nvidia_h200.json > table.md

CPU figures: ``benchmarks/results/anchors.json`` (rows ``torchntk JC/NVP/SD``) and ``resnet.json`` (224×224, N = 1),
where a case was measured there; ``—`` where not.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent.parent / "results"
METHODS = {"jacobian_contraction": "JC", "ntk_vector_products": "NVP", "structured_derivatives": "SD"}


def _ms(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    return f"{seconds * 1e3:,.1f}" if seconds < 10 else f"{seconds:,.1f} s"


def _cell(point: dict[str, Any] | None, key: str = "median_s") -> str:
    if point is None:
        return "—"
    if point.get("status") != "ok":
        return point.get("status", "?") if point.get("status") != "skipped" else f"skipped ({point.get('error')})"
    return _ms(point.get(key))


def _load(path: Path) -> list[dict[str, Any]]:
    try:
        return json.loads(path.read_text()).get("points", [])
    except (OSError, ValueError):
        return []


def cpu_anchor(points: list[dict], width: int, outputs: int, method: str) -> dict | None:
    row = f"torchntk {METHODS[method]}"
    return next((p for p in points if p.get("W") == width and p.get("O") == outputs and p.get("row") == row), None)


def cpu_resnet(points: list[dict], model: str, resolution: int, outputs: int, method: str) -> dict | None:
    case = (model, resolution, outputs, 1, method)
    return next(
        (p for p in points if (p.get("model"), p.get("R"), p.get("O"), p.get("N"), p.get("method")) == case), None
    )


def render(payload: dict[str, Any]) -> str:
    env = payload["environment"]
    points = payload["points"]
    versions = env.get("versions", {})
    lines = [
        f"Measured by `benchmarks/gpu_check.sh` on **{env['device_name']}** ({env.get('device_memory_gb')} GB, "
        f"driver {env.get('driver')}), torch {versions.get('torch')}, jax {versions.get('jax')}, "
        f"torchntk {env.get('torchntk_commit')}; times are medians of warm calls in ms (s where marked), CPU "
        "figures from the committed 2-core runs (`benchmarks/results/anchors.json`, `resnet.json`).",
    ]
    if env.get("pinned_versions_differ"):
        lines.append(f"Library versions differ from the pins: {env['pinned_versions_differ']} (the device image's).")
    anchors_cpu = _load(RESULTS / "anchors.json")
    rows = []
    anchor = [p for p in points if p.get("section") == "anchors"]
    for width, outputs in sorted({(p["W"], p["O"]) for p in anchor}):
        cells = [f"W={width}, O={outputs}"]
        for method in METHODS:
            gpu = next((p for p in anchor if (p["W"], p["O"], p["method"]) == (width, outputs, method)), None)
            cells += [_cell(gpu), _cell(cpu_anchor(anchors_cpu, width, outputs, method))]
        rows.append(cells)
    header = ["FCN depth 3, N=8"] + [f"{m} {where}" for m in METHODS.values() for where in ("GPU", "CPU")]
    lines += ["", _table(header, rows)]

    resnet_cpu = _load(RESULTS / "resnet.json") + _load(RESULTS / "resnet_full_ntk.json")
    rows = []
    resnet = [p for p in points if p.get("section") in ("resnet18", "resnet50")]
    for model, resolution, outputs in sorted({(p["model"], p["R"], p["O"]) for p in resnet}):
        cells = [f"{model} {resolution}×{resolution}, O={outputs}"]
        case = [p for p in resnet if (p["model"], p["R"], p["O"]) == (model, resolution, outputs)]
        for method in METHODS:
            gpu = next((p for p in case if p["method"] == method), None)
            cpu = cpu_resnet(resnet_cpu, model, resolution, outputs, method)
            cells += [_cell(gpu, "per_pair_s"), _cell(cpu, "time_per_pair_s")]
        sd = next((p for p in case if p["method"] == "structured_derivatives"), {})
        cells.append(_ms(sd.get("cold_s")))
        rows.append(cells)
    header = ["one pair (ms per pair)"] + [f"{m} {w}" for m in METHODS.values() for w in ("GPU", "CPU")]
    lines += ["", _table([*header, "SD first call (GPU)"], rows)]

    widths = [p for p in points if p.get("section") == "widths"]
    if widths:
        rows = []
        for method, short in METHODS.items():
            ok = [p for p in widths if p["method"] == method and p.get("status") == "ok"]
            best = max(ok, key=lambda p: p["W"], default=None)
            stop = next((p for p in widths if p["method"] == method and p.get("status") not in ("ok", "skipped")), None)
            rows.append(
                [
                    short,
                    str(best["W"]) if best else "—",
                    _ms(best["median_s"]) if best else "—",
                    f"W={stop['W']}: {stop['status']}" if stop else "not reached",
                ]
            )
        lines += ["", _table(["FCN O=10, N=8", "largest W", "time there", "first failure"], rows)]
    return "\n".join(lines) + "\n"


def _table(header: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=Path, nargs="+", help="bench_gpu.py JSON files")
    args = parser.parse_args(argv)
    print("\n".join(render(json.loads(path.read_text())) for path in args.results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
