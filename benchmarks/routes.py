"""The two conversion routes side by side: conversion seconds, first call, structured-derivatives NTK time, and the
primitives of the linearized jaxpr, per torchvision model.

torchvision classification models with num_classes=10 at 32×32, float32, N1 = N2 = 2, trace_axes=(); the NTK time is
the median of ≥ 5 warm runs (``_common.timed_side_by_side``, both routes round-robin in one process). Conversion
starts from an empty cache (``TORCHNTK_CACHE_DIR`` is a fresh temporary directory) and includes the ONNX export.
Writes ``results/routes.json``.

Run: ``python benchmarks/routes.py [--models resnet18 mobilenet_v2 ...]``
"""

from __future__ import annotations

import argparse
import collections
import os
import tempfile
import time

import jax
import torch
import torchvision
from _common import RESULTS, load_average, markdown_table, timed_side_by_side, write_json

from torchntk.bridge import structured_ntk_fn
from torchntk.converters import to_jax
from torchntk.converters.api import clear_memory_cache

ROUTES = ("onnx-tf", "onnx-jax")


def primitive_counts(converted, x) -> dict[str, int]:
    """Primitives of the linearized per-example function, nested jaxprs included."""
    _, linear = jax.linearize(lambda p: converted.fn(p, x), converted.params)
    counts: collections.Counter = collections.Counter()

    def walk(jaxpr) -> None:
        for eqn in jaxpr.eqns:
            counts[eqn.primitive.name] += 1
            for value in eqn.params.values():
                inner = getattr(value, "jaxpr", value)
                if hasattr(inner, "eqns"):
                    walk(inner)

    walk(jax.make_jaxpr(linear)(converted.params).jaxpr)
    return dict(sorted(counts.items()))


def measure(name: str) -> dict:
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, num_classes=10).eval()
    x1, x2 = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32)
    jx1, jx2 = (jax.numpy.asarray(x1.numpy()),), (jax.numpy.asarray(x2.numpy()),)
    row: dict = {"model": name}
    calls = {}
    for route in ROUTES:
        clear_memory_cache()
        with tempfile.TemporaryDirectory() as cache:
            os.environ["TORCHNTK_CACHE_DIR"] = cache
            start = time.perf_counter()
            converted = to_jax(model, x1, route=route)
            row[f"{route} conversion_s"] = time.perf_counter() - start
        fn = converted.fn

        def batched(params, inputs, fn=fn):
            return jax.vmap(lambda *example: fn(params, *example))(*inputs)

        ntk_fn = structured_ntk_fn(batched)
        start = time.perf_counter()
        ntk_fn(jx1, jx2, converted.params).block_until_ready()
        row[f"{route} first_call_s"] = time.perf_counter() - start
        calls[route] = lambda ntk_fn=ntk_fn, p=converted.params: ntk_fn(jx1, jx2, p).block_until_ready()
        row[f"{route} primitives"] = primitive_counts(converted, jx1[0][0])
    timed = timed_side_by_side(calls, {})
    for route in ROUTES:
        row[f"{route} ntk_s"] = timed[route]["median_s"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models", nargs="+", default=["resnet18", "mobilenet_v2", "efficientnet_b0", "convnext_tiny", "vgg11_bn"]
    )
    args = parser.parse_args()
    load_before = load_average()
    rows = [measure(name) for name in args.models]
    write_json(RESULTS / "routes.json", {"load_average": [load_before, load_average()], "rows": rows})
    table = []
    for row in rows:
        cells = [row["model"]]
        for route in ROUTES:
            primitives = sum(row[f"{route} primitives"].values())
            cells += [
                f"{row[f'{route} conversion_s']:.2f}",
                f"{row[f'{route} first_call_s']:.2f}",
                f"{row[f'{route} ntk_s'] * 1e3:.0f}",
                f"{primitives} ({row[f'{route} primitives'].get('transpose', 0)} transpose)",
            ]
        table.append(cells)
    header = ["model"] + [f"{r} {c}" for r in ROUTES for c in ("convert s", "first NTK s", "NTK ms", "primitives")]
    print(markdown_table(header, table))


if __name__ == "__main__":
    main()
