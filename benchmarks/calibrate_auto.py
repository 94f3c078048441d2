"""Fit ``implementation="auto"``'s time model to measured times: the constants in ``torchntk/_auto.py``.

Reads the side-by-side medians of ``results/fcn.json``, ``results/resnet.json`` (with :data:`RESNET_REMEASURED`'s
cases in place of its own) and ``results/auto_choice.json``
(every method timed in one process), rebuilds each case, computes the time model's terms for it
(``torchntk._auto.native_terms`` / ``structured_terms``: forward-pass multiply-adds by ``torchntk._macs`` and the
paper's Table 1 for the torch-native methods, XLA's cost analysis for structured derivatives) and fits, per method,
non-negative seconds per term by least squares on the *relative* error (``scipy.optimize.nnls`` with each row
divided by its measured time). It also times the cold conversion of each architecture, for the conversion-time
model. Writes
``results/auto_calibration.json`` and prints the constants to paste into ``_auto.py`` with the fit's quality
(predicted / measured: median, and the worst factor in either direction).

``--compile`` fits only the compile-time model (``_auto._FIRST_CALL_SECONDS_PER_TERM["compile"]``: tracing and XLA
compilation of the first structured call against ``_auto.compile_terms``) to the rows of
``results/compile_sweep.json`` (scaled by the CPU share the load average left), then scales it up to cover every
point (an underestimate would let auto stall the user); writes ``results/compile_calibration.json``.

Run: ``python benchmarks/calibrate_auto.py [--reuse | --compile]`` (about 5 minutes: it converts ~25 architectures;
``--reuse`` takes XLA's costs and the conversion times from the previous ``auto_calibration.json`` and converts
only what is new; ``--reuse --reconvert`` times every conversion again). The conversion-time model is fitted to these
conversions and to ``results/compile_sweep.json``'s (every zoo builder's), with a term for a process's first
conversion (torch.export's warm-up: ``first_export``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np
from _common import RESULTS, write_json
from scipy.optimize import nnls

METHODS = ("jacobian_contraction", "ntk_vector_products", "structured_derivatives")
OUT = RESULTS / "auto_calibration.json"
# sd_blocking.py's cases measured with output blocks in XLA:CPU's fast layout (2026-12-06): the blocked points, at the
# max_memory each ran with (the blocks, and Jacobian contraction's rebuilt rows, depend on it). The older "peak"
# case ran before that layout fix and is left out.
BLOCKED_CASES = ("trace-32", "trace-small", "trace", "full")


# ResNet cases re-measured after a change to what every call pays (the per-call checks' θ-sized passes, 2026-12-06):
# their points replace resnet.json's of the same case and method (resnet.json's 224×224 and 1000-class ones stay).
RESNET_REMEASURED = RESULTS / "resnet_32_checks.json"


def benchmark_points(name: str) -> list[dict]:
    """The points of ``results/<name>.json``; for ``resnet``, :data:`RESNET_REMEASURED`'s where it has the case."""
    points = json.loads((RESULTS / f"{name}.json").read_text())["points"]
    if name != "resnet" or not RESNET_REMEASURED.exists():
        return points
    newer = json.loads(RESNET_REMEASURED.read_text())["points"]

    def key(point: dict) -> tuple:
        return tuple(point.get(k) for k in ("model", "R", "O", "N", "method"))

    replaced = {key(point) for point in newer}
    return [point for point in points if key(point) not in replaced] + newer


def measured_points() -> list[tuple[str, str, dict, float]]:
    """``(case id, architecture id, spec, measured median seconds)`` per method; spec says how to rebuild it."""
    found = []
    for name in ("fcn", "resnet"):
        for point in benchmark_points(name):
            if point["method"] in METHODS and point.get("status") == "ok" and point.get("median_s"):
                spec = {k: point.get(k) for k in ("model", "depth", "W", "R", "O", "N", "in_dim")}
                arch = {k: v for k, v in spec.items() if k != "N"}
                found.append(
                    (
                        json.dumps(spec, sort_keys=True),
                        json.dumps(arch, sort_keys=True),
                        {"bench": name, **point},
                        point,
                    )
                )
    auto_choice = RESULTS / "auto_choice.json"
    if auto_choice.exists():
        for case in json.loads(auto_choice.read_text())["cases"]:
            times = case.get("methods") or case.get("times")
            for method, timing in times.items():
                spec = {"bench": "auto_choice", "case": case["case"], "method": method}
                found.append((case["case"], case["case"], spec, {"method": method, "median_s": timing["median_s"]}))
    found += blocked_points()
    return [(case, arch, spec, point["median_s"]) for case, arch, spec, point in found]


def blocked_points() -> list[tuple[str, str, dict, dict]]:
    """``sd_blocking.py``'s one-call times (:data:`BLOCKED_CASES`, every method measured): long calls, so the first
    call's compilation (seconds, against minutes) is left in."""
    import sd_blocking

    found = []
    for name in BLOCKED_CASES:
        for suffix in sd_blocking.SUFFIX.values():
            path = RESULTS / f"sd_blocking_{name}{suffix}.json"
            if not path.exists():
                continue
            for point in json.loads(path.read_text())["points"]:
                if point.get("status") != "ok":
                    continue
                spec = {"bench": "sd_blocking", "case": name, "max_memory": point["max_memory"]}
                arch = {k: point[k] for k in ("model", "R", "O")}
                found.append(
                    (
                        json.dumps(spec, sort_keys=True),
                        json.dumps(arch, sort_keys=True),
                        {**spec, "method": point["implementation"]},
                        {"method": point["implementation"], "median_s": point["first_call_s"]},
                    )
                )
    return found


def build(spec: dict):
    """``(model, x1, x2)`` of one measured case, as its benchmark built it."""
    if spec["bench"] == "auto_choice":
        import auto_choice

        model, x = auto_choice.cases(with_resnet=True)[spec["case"]]
        return model, x, None
    if spec["bench"] == "sd_blocking":
        import sd_blocking

        return sd_blocking.build(sd_blocking.CASES[spec["case"]])
    import fcn
    import resnet

    return (fcn if spec["bench"] == "fcn" else resnet).build(spec)


def fit(terms: np.ndarray, seconds: np.ndarray) -> tuple[list[float], dict]:
    """Non-negative coefficients minimising the relative error; and the fit's quality."""
    scale = terms.max(axis=0) + 1e-300  # well-conditioned columns; undone below
    coefficients, _ = nnls(terms / scale / seconds[:, None], np.ones_like(seconds))
    coefficients = coefficients / scale
    ratio = terms @ coefficients / seconds
    quality = {"points": len(seconds), "median_ratio": float(np.median(ratio)), "worst": worst(ratio)}
    return coefficients.tolist(), quality


def choice_quality(fitted: dict, terms_of: dict, measured: dict) -> dict:
    """What the fit's choice costs where two or more methods were measured: the measured time of the method it
    predicts fastest over the fastest's (median, mean, worst) and how often it is not the fastest. What auto needs
    of the time model; the per-method errors above can be large where the choice is still right."""
    regrets = []
    for case, seconds in measured.items():
        if len(seconds) > 1:
            predicted = {m: float(np.dot(fitted[m], terms_of[case][m])) for m in seconds}
            regrets.append(seconds[min(predicted, key=predicted.get)] / min(seconds.values()))
    regret = np.array(regrets)
    return {
        "cases": len(regrets),
        "median": float(np.median(regret)),
        "mean": float(regret.mean()),
        "worst": float(regret.max()),
        "not_fastest": int((regret > 1).sum()),
    }


def worst(ratio: np.ndarray) -> float:
    """The largest factor by which a prediction misses, in either direction."""
    return float(max(ratio.max(), 1 / ratio.min()))


def sweep_rows() -> dict[str, dict]:
    """``results/compile_sweep.json``'s rows: the whole zoo through onnx-jax under one code (the zoo's own rows were
    measured at several stops, before the fast tier and rolling among them)."""
    return json.loads((RESULTS / "compile_sweep.json").read_text())["rows"]


def sweep_problem(name: str, row: dict):  # noqa: ANN201 - a torchntk NTKProblem
    """The builder of a sweep row as an NTK problem at the row's input size (what the time model's terms read)."""
    import torch
    import torchvision

    from torchntk._problem import prepare

    model = torchvision.models.get_model(name, weights=None, num_classes=10).eval()
    x = torch.randn(1, 3, row["size"], row["size"])
    return prepare(model, x, None, params=None, trace_axes=(), diagonal_axes=())


def compile_points() -> list[tuple[str, float, str]]:
    """``(torchvision model, seconds of tracing + compilation, source)`` of :func:`sweep_rows`."""
    points = []
    for name, row in sweep_rows().items():
        if "compile_s" in row:
            # XLA compiles on one thread: under a 1-minute load L on C cores it got about C / L of one.
            share = min(1.0, (os.cpu_count() or 1) / max(row["load_average"][0], 1e-9))
            points.append((name, (row["lower_s"] + row["compile_s"]) * share, "compile_sweep"))
    return points


def fit_compile() -> None:
    from torchntk import _auto

    points, rows = compile_points(), sweep_rows()
    terms = {name: _auto.compile_terms(sweep_problem(name, rows[name])) for name, _, _ in points}
    seconds = np.array([s for _, s, _ in points])
    coefficients, quality = fit(np.array([terms[n] for n, _, _ in points]), seconds)
    ratio = np.array([terms[n] for n, _, _ in points]) @ np.array(coefficients) / seconds
    cover = float(max(1.0, 1.0 / ratio.min()))  # no measured point predicted below its time
    coefficients = [c * cover for c in coefficients]
    quality |= {"cover_factor": cover}
    write_json(
        RESULTS / "compile_calibration.json",
        {"coefficients": coefficients, "quality": quality, "points": points, "terms": terms},
    )
    print(f'"compile": ({", ".join(f"{v:.3e}" for v in coefficients)}),  # {quality}')


def sweep_conversions() -> dict[str, dict]:
    """The conversions of :func:`sweep_rows` (the zoo's builders, onnx-jax, the check in line; loads below 1.5) with
    their terms; each was its process's first."""
    from torchntk import _auto

    return {
        name: {"seconds": row["convert_s"], "terms": _auto.conversion_terms(sweep_problem(name, row))}
        for name, row in sweep_rows().items()
        if "convert_s" in row
    }


def cold_conversion_seconds(problem) -> float:  # noqa: ANN001 - a torchntk NTKProblem
    """One conversion with nothing cached: a fresh cache directory, no memory-cache entry, no jit cache.

    Two cases of one architecture under different labels would otherwise time a memory-cache hit (0 s), which broke
    the relative fit of the conversion model."""
    import jax

    from torchntk.bridge import torch_glue
    from torchntk.converters import clear_memory_cache

    os.environ["TORCHNTK_CACHE_DIR"] = tempfile.mkdtemp(prefix="torchntk-calibrate-")
    clear_memory_cache()
    jax.clear_caches()
    start = time.perf_counter()
    torch_glue.convert(problem)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reuse", action="store_true", help="reuse XLA costs and conversion times")
    parser.add_argument("--reconvert", action="store_true", help="with --reuse: time the conversions again")
    parser.add_argument("--compile", action="store_true", help="fit only the compile-time model")
    args = parser.parse_args()
    if args.compile:
        fit_compile()
        return
    previous = json.loads(OUT.read_text()) if args.reuse else {}
    import sd_blocking
    import tensorflow  # noqa: F401 - imported before timing conversions: its import is no conversion's cost
    import torch

    from torchntk import _auto
    from torchntk._problem import prepare
    from torchntk._tiles import TileOptions
    from torchntk.bridge import torch_glue

    xla_costs: dict[str, list[float]] = previous.get("xla_costs", {})
    conversions: dict[str, dict] = {} if args.reconvert else previous.get("conversions", {})
    rows: dict[str, list[tuple[list[float], float]]] = {m: [] for m in METHODS}
    measured: dict[str, dict[str, float]] = {}  # per case: each method's measured seconds
    terms_of: dict[str, dict] = {}
    for case, arch, spec, seconds in measured_points():
        if case not in terms_of:
            model, x1, x2 = build(spec)
            trace = tuple(sd_blocking.CASES[spec["case"]]["trace"]) if spec["bench"] == "sd_blocking" else ()
            problem = prepare(model, x1, x2, params=None, trace_axes=trace, diagonal_axes=())
            blocked = TileOptions(max_memory=spec.get("max_memory"))  # the blocked points' budget, else the default
            if spec["bench"] != "sd_blocking":  # the blocked points' architecture (resnet18) is timed already
                if arch not in conversions:
                    conversions[arch] = {"seconds": cold_conversion_seconds(problem)}
                conversions[arch]["terms"] = _auto.conversion_terms(problem)
            with torch.no_grad():
                if case not in xla_costs:
                    cost = torch_glue.structured_cost(problem, TileOptions(max_memory=spec.get("max_memory", int(8e9))))
                    xla_costs[case] = [cost.macs, cost.bytes_accessed]
                try:
                    native = _auto.native_terms(problem, _auto.forward_flops(problem), blocked)
                except ValueError:  # a budget Jacobian contraction cannot meet: only another method ran there
                    native = _auto.native_terms(problem, _auto.forward_flops(problem))
            terms_of[case] = {**native, "structured_derivatives": _auto.structured_terms(problem, *xla_costs[case])}
            print(case, {m: [f"{t:.3g}" for t in terms] for m, terms in terms_of[case].items()}, flush=True)
        rows[spec["method"]].append((terms_of[case][spec["method"]], seconds))
        measured.setdefault(case, {})[spec["method"]] = seconds

    fitted, quality = {}, {}
    for method, data in rows.items():
        fitted[method], quality[method] = fit(np.array([t for t, _ in data]), np.array([s for _, s in data]))
    quality["choice"] = choice_quality(fitted, terms_of, measured)
    # The first conversion in a process also warms torch.export up: one more term, 1 for a process's first conversion
    # (this script's first, and each of the compile sweep's: one per process), fitted as "first_export".
    first, *rest = conversions.values()
    swept = sweep_conversions()
    firsts = [first, *swept.values()]
    coefficients, quality["conversion"] = fit(
        np.array([[*c["terms"], 0.0] for c in rest] + [[*c["terms"], 1.0] for c in firsts]),
        np.array([c["seconds"] for c in rest + firsts]),
    )
    fitted["conversion"], fitted["first_export"] = coefficients[:-1], coefficients[-1:]
    quality["first_export"] = {"points": len(firsts)}

    write_json(
        OUT,
        {
            "coefficients": fitted,
            "quality": quality,
            "terms": terms_of,
            "xla_costs": xla_costs,
            "conversions": conversions,
            "swept_conversions": swept,
            "python": sys.version.split()[0],
        },
    )
    for key, values in fitted.items():
        print(f"    {key!r}: ({', '.join(f'{v:.3e}' for v in values)}),  # {quality[key]}")
    print("the fit's choice, measured time over the fastest's:", quality["choice"])


if __name__ == "__main__":
    main()
