"""Structured derivatives over many examples (issue 11): does a tiled kernel do each example's work once?

resnet18 at 32×32, ``O = 10``, ``trace_axes=(-1,)``, ``x2=None``, N = 256 examples (``--n``), float32. Measured in
one process, side by side:

* the two parts of one tile on their own, at the tile size the call uses (``c`` examples per side): the
  ingredients of ``c`` examples (cotangents and sub-arrays) and the contraction of two such sides, as medians of
  repeated warm calls; per example ``t_ing = t(ingredients of c) / c``, per pair ``t_pair = t(contraction) / c²``;
* the whole ``torchntk.ntk(model, x)`` call (warm: a first call compiled the tile programs).

The issue's yardstick is ``2N·t_ing + N²·t_pair`` (every example's ingredients once per side, every pair's
contraction once); the target is a whole call within 1.5× of it. For ``x2=None`` the least work is ``N·t_ing +
N(N+1)/2·t_pair`` (one side, upper triangle), reported beside it.

Usage::

    python benchmarks/sd_tiling.py [--n 256] [--out benchmarks/results/sd_tiling.json]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import _common as c


def _median_seconds(call, repeats: int = 5) -> float:
    call()  # warm
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run(args: argparse.Namespace) -> dict:
    import jax
    import jax.numpy as jnp
    import torch
    import torchvision

    import torchntk
    from torchntk._problem import prepare
    from torchntk._tiles import TileOptions
    from torchntk.bridge import memory_plan, torch_glue

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(args.n, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    problem = prepare(model, x, None, params=None, trace_axes=(-1,), diagonal_axes=())
    chunk = memory_plan.choose_blocks(problem, TileOptions(max_memory=int(args.max_memory_gb * c.GB))).chunk
    chunk = min(chunk, args.n)

    def whole() -> torch.Tensor:
        return torchntk.ntk(
            model,
            x,
            trace_axes=(-1,),
            implementation="structured_derivatives",
            max_memory=int(args.max_memory_gb * c.GB),
            progress=False,
        )

    start = time.perf_counter()
    kernel = whole()  # converts, compiles the tile programs
    first_s = time.perf_counter() - start
    start = time.perf_counter()
    again = whole()
    whole_s = time.perf_counter() - start
    assert torch.equal(kernel, again)

    tile_problem = prepare(model, x[:chunk], None, params=None, trace_axes=(-1,), diagonal_axes=())
    converted = torch_glue.convert(tile_problem)
    inputs = (jnp.asarray(x[:chunk].numpy()),)
    params = {name: jnp.asarray(value.detach().numpy()) for name, value in tile_problem.params.items()}
    ingredients = torch_glue.compiled_ingredients(tile_problem, converted, inputs, params)
    side = ingredients(inputs, params)
    contraction = torch_glue.compiled_contraction(tile_problem, converted, side, side)
    t_ingredients = _median_seconds(lambda: jax.block_until_ready(ingredients(inputs, params))) / chunk
    t_pair = _median_seconds(lambda: jax.block_until_ready(contraction(side, side))) / chunk**2
    n = args.n
    yardstick = 2 * n * t_ingredients + n * n * t_pair
    least = n * t_ingredients + n * (n + 1) / 2 * t_pair
    point = {
        "status": "ok",
        "model": "resnet18",
        "R": 32,
        "O": 10,
        "N": n,
        "trace_axes": [-1],
        "x2": None,
        "chunk": chunk,
        "first_call_s": first_s,
        "whole_s": whole_s,
        "ingredients_per_example_s": t_ingredients,
        "contraction_per_pair_s": t_pair,
        "yardstick_s": yardstick,
        "least_work_s": least,
        "ratio_to_yardstick": whole_s / yardstick,
        "ratio_to_least_work": whole_s / least,
    }
    print(point, flush=True)
    return {"points": [point]}


def table(points: list[dict]) -> str:
    header = ["case", "chunk", "whole call s", "t_ing ms/example", "t_pair ms/pair", "2N·t_ing + N²·t_pair s"]
    header += ["ratio", "N·t_ing + N(N+1)/2·t_pair s", "ratio"]
    rows = [
        [
            f"{p['model']} {p['R']}×{p['R']} O={p['O']} N={p['N']} traced, x2=None",
            p["chunk"],
            f"{p['whole_s']:.1f}",
            f"{1e3 * p['ingredients_per_example_s']:.2f}",
            f"{1e3 * p['contraction_per_pair_s']:.3f}",
            f"{p['yardstick_s']:.1f}",
            f"{p['ratio_to_yardstick']:.2f}",
            f"{p['least_work_s']:.1f}",
            f"{p['ratio_to_least_work']:.2f}",
        ]
        for p in points
    ]
    return c.markdown_table(header, rows)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--max-memory-gb", type=float, default=8.0)
    c.add_run_options(parser, budget_help="unused", out=c.RESULTS / "sd_tiling.json")
    args = parser.parse_args(argv)
    if args.smoke:
        args.n = 4
    return c.run_benchmark("sd_tiling", __doc__, args, run, table, converter_needed=False)


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
