"""Is ``implementation="auto"`` right? A sequence of its calls against every fixed method, side by side.

Cases (float32): a wide FCN with many outputs, a tiny model with one example and many outputs, a small FCN with one
output and many examples, and, with ``--resnet``, torchvision's resnet18 at 32×32. For each case, starting cold
(no conversion in memory or on disk, nothing compiled; the process itself is warm — TensorFlow imported, torch.func
and torch.export run once on a throwaway model — so that no case pays the process's one-time costs for the others):

* **first call**: auto and every fixed method each compute the kernel once in a new process (a forkserver child with
  torch, JAX and torchntk imported, and its own empty conversion cache): imports, conversion and compilation
  included, as a user's script meets them.
* **sequence**: in this process, ``torchntk.ntk(..., implementation="auto")`` until it has converted the model (or
  decided not to) and then ``STEADY_CALLS`` more, each call timed and its choice recorded; then every fixed method
  from cold (a first call, then the median of warm calls, ``timed_side_by_side``).

Reported ratios (auto / the best fixed method): the first call, the **steady state** (auto's last calls against the
best warm method), and the **total** over the whole sequence of n calls against the best fixed method's
``first + (n - 1) · warm`` (the best choice in hindsight). Writes ``results/auto_choice.json``.

Run: ``python benchmarks/auto_choice.py [--resnet]``
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch
from _common import (
    RESULTS,
    forget_compiled,
    load_average,
    markdown_table,
    measure_calls,
    ntk_mlp,
    preload_converter,
    probe,
    timed_side_by_side,
    torchntk_case,
    write_json,
)

import torchntk
from torchntk import _auto
from torchntk.converters import clear_memory_cache

METHODS = ("jacobian_contraction", "ntk_vector_products", "structured_derivatives")
STEADY_CALLS = 20
MAX_AUTO_S = 120.0  # a case whose torch-native calls never add up to the conversion stops here


def cases(with_resnet: bool) -> dict[str, tuple[torch.nn.Module, torch.Tensor]]:
    torch.manual_seed(0)
    found = {
        "FCN W=512 depth 3, O=100, N=8": (ntk_mlp(512, 512, 3, 100), torch.randn(8, 512)),
        "FCN W=32 depth 1, O=256, N=1": (ntk_mlp(16, 32, 1, 256), torch.randn(1, 16)),
        "FCN W=64 depth 2, O=1, N=64": (ntk_mlp(16, 64, 2, 1), torch.randn(64, 16)),
    }
    if with_resnet:
        import torchvision

        model = torchvision.models.resnet18(num_classes=10).eval()
        found["resnet18 32x32, O=10, N=4"] = (model, torch.randn(4, 3, 32, 32))
    return found


def first_call_target(spec: dict, budget_s: float) -> dict:
    """Runs in a child: one method's first call on one case, conversion (from an empty cache) included."""
    os.environ["TORCHNTK_CACHE_DIR"] = tempfile.mkdtemp(prefix="torchntk-auto-choice-")
    model, x = cases(spec["resnet"])[spec["case"]]
    prepare, call = torchntk_case(model, x, None, spec["method"], max_memory=8e9)
    result = measure_calls(prepare, call, budget_s, warm=False)
    result["total_s"] = (result["conversion_s"] or 0.0) + result["first_call_s"]
    return result


def first_calls(name: str, with_resnet: bool) -> dict[str, dict]:
    """Each method's and auto's first call in a new process."""
    found = {}
    for method in (*METHODS, "auto"):
        spec = {"case": name, "resnet": with_resnet, "method": method}
        found[method] = probe(first_call_target, spec, memory_limit=16e9, timeout_s=600, budget_s=60)
        if found[method].get("status") != "ok":
            raise RuntimeError(f"{name}, {method}: {found[method]}")
    return found


def cold_start() -> None:
    """No conversion in memory or on disk, no compiled kernel, no auto state."""
    os.environ["TORCHNTK_CACHE_DIR"] = tempfile.mkdtemp(prefix="torchntk-auto-choice-")
    clear_memory_cache()
    forget_compiled()
    for cached in (_auto._CHOICES, _auto._NATIVE, _auto._SPENT, _auto._FAILED):
        cached.clear()


def timed(call) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def warm_process() -> None:
    """Pay the process's one-time costs (imports, torch.func and torch.export warm-up) on a throwaway model."""
    import tensorflow  # noqa: F401

    cold_start()  # an empty disk cache, so that the throwaway conversion really runs torch.export
    model, x = ntk_mlp(3, 4, 1, 2), torch.randn(2, 3)
    for method in METHODS:
        torchntk.ntk(model, x, implementation=method, progress=False)


def auto_sequence(model: torch.nn.Module, x: torch.Tensor) -> list[dict]:
    """Auto's calls from cold until it stops waiting for the conversion, then ``STEADY_CALLS`` more."""
    cold_start()
    calls, steady, started = [], 0, time.perf_counter()
    while steady < STEADY_CALLS:
        start = time.perf_counter()
        # explain() is what ntk() runs first (and caches): timed with the call, since it may convert the model.
        explanation = torchntk.explain(model, x)
        torchntk.ntk(model, x, progress=False)
        seconds = time.perf_counter() - start
        calls.append({"choice": explanation.choice, "seconds": seconds, "waiting": explanation.conversion_seconds})
        if explanation.conversion_seconds is None or time.perf_counter() - started > MAX_AUTO_S:
            steady += 1
    return calls


def fixed_methods(model: torch.nn.Module, x: torch.Tensor) -> dict[str, dict]:
    """Each method's cold first call, then the warm medians side by side."""
    first = {}
    for method in METHODS:
        cold_start()
        first[method] = timed(lambda m=method: torchntk.ntk(model, x, implementation=m, progress=False))
    calls = {m: (lambda m=m: torchntk.ntk(model, x, implementation=m, progress=False)) for m in METHODS}
    warm = timed_side_by_side(calls, {})
    return {m: {**warm[m], "first_call_s": first[m]} for m in METHODS}


def summarize(name: str, first: dict[str, dict], sequence: list[dict], methods: dict[str, dict]) -> dict:
    n = len(sequence)
    first_s = {m: r["total_s"] for m, r in first.items()}
    auto_total = sum(c["seconds"] for c in sequence)
    hindsight = {m: t["first_call_s"] + (n - 1) * t["median_s"] for m, t in methods.items()}
    steady_s = statistics.median(c["seconds"] for c in sequence[-STEADY_CALLS:])
    return {
        "case": name,
        "calls": n,
        "first_choice": sequence[0]["choice"],
        "steady_choice": sequence[-1]["choice"],
        "converted_at_call": next((i + 1 for i, c in enumerate(sequence) if c["waiting"] is None), None),
        "first_call_s": first_s,
        "first_call_ratio": first_s["auto"] / min(first_s[m] for m in METHODS),
        "steady_ratio": steady_s / min(t["median_s"] for t in methods.values()),
        "total_ratio": auto_total / min(hindsight.values()),
        "auto_first_in_process_s": sequence[0]["seconds"],
        "auto_steady_s": steady_s,
        "auto_total_s": auto_total,
        "hindsight_total_s": hindsight,
        "methods": methods,
        "sequence": sequence,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resnet", action="store_true", help="add torchvision resnet18 at 32x32 (slow)")
    args = parser.parse_args()
    preload_converter(True)
    warm_process()

    results, rows = [], []
    for name, (model, x) in cases(args.resnet).items():
        first = first_calls(name, args.resnet)
        sequence = auto_sequence(model, x)
        methods = fixed_methods(model, x)
        result = summarize(name, first, sequence, methods)
        results.append(result)
        rows.append(
            [name, f"{result['first_choice']} → {result['steady_choice']} (call {result['converted_at_call']})"]
            + [f"{result[k]:.2f}" for k in ("first_call_ratio", "steady_ratio", "total_ratio")]
            + [f"{result['first_call_s'][m]:.2f} s / {t['median_s'] * 1e3:.1f} ms" for m, t in methods.items()]
            + [str(result["calls"])]
        )
        print(rows[-1], flush=True)
    write_json(RESULTS / "auto_choice.json", {"load_average": load_average(), "cases": results})
    header = ["case", "auto: first → steady (converted at call)", "first call (new process)", "steady", "total"]
    print(markdown_table(header + [f"{m}: first (new process) / warm" for m in METHODS] + ["calls"], rows))


if __name__ == "__main__":
    main()
