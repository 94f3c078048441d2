"""Time torchntk's structured-derivatives NTK on the paper's FCN (§4.1): the issue-4 target.

3 hidden ReLU layers of width W, no bias, input dimension W (as in the paper), N1 = N2 = 8, float32,
trace_axes=(), jit; median of ``--repeats`` runs after a warm-up. neural-tangents 0.6.5 on the reference machine:
4.8 / 22.8 ms (W=512, O=10 / 100), 8.3 / 40 ms (W=1024, O=10 / 100).

Usage: ``python benchmarks/bench_fcn_structured.py [--widths 512 1024] [--outputs 10 100] [--json out.json]``
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp

from torchntk.bridge import structured_ntk_fn

NEURAL_TANGENTS_MS = {(512, 10): 4.8, (512, 100): 22.8, (1024, 10): 8.3, (1024, 100): 40.0}


def fcn(params: list[jax.Array], x: jax.Array) -> jax.Array:
    """``x -> W_3 relu(W_2 relu(W_1 relu(W_0 x)))`` with NTK scaling, no bias: ``(N, W) -> (N, O)``."""
    for w in params[:-1]:
        x = jax.nn.relu(x @ w / jnp.sqrt(w.shape[0]))
    return x @ params[-1] / jnp.sqrt(params[-1].shape[0])


def make_params(key: jax.Array, width: int, outputs: int, depth: int = 3) -> list[jax.Array]:
    shapes = [(width, width)] * depth + [(width, outputs)]
    keys = jax.random.split(key, len(shapes))
    return [jax.random.normal(k, s, jnp.float32) for k, s in zip(keys, shapes, strict=True)]


def time_case(width: int, outputs: int, n: int, repeats: int, same_inputs: bool) -> dict[str, float]:
    """``same_inputs``: ``ntk_fn(x1, None, params)`` (per-example work done once) instead of a distinct ``x2``."""
    key1, key2, key3 = jax.random.split(jax.random.PRNGKey(0), 3)
    params = make_params(key1, width, outputs)
    x1 = jax.random.normal(key2, (n, width), jnp.float32)
    x2 = None if same_inputs else jax.random.normal(key3, (n, width), jnp.float32)
    ntk_fn = jax.jit(structured_ntk_fn(fcn, trace_axes=()))
    start = time.perf_counter()
    ntk_fn(x1, x2, params).block_until_ready()
    compile_s = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        ntk_fn(x1, x2, params).block_until_ready()
        times.append(1e3 * (time.perf_counter() - start))
    return {
        "W": width,
        "O": outputs,
        "x2": "None (= x1)" if same_inputs else "distinct",
        "median_ms": statistics.median(times),
        "min_ms": min(times),
        "compile_s": compile_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[512, 1024])
    parser.add_argument("--outputs", type=int, nargs="+", default=[10, 100])
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    results = []
    print(f"backend={jax.default_backend()} N1=N2={args.n} float32 trace_axes=() input dim = W")
    for width in args.widths:
        for outputs in args.outputs:
            for same_inputs in (False, True):
                row = time_case(width, outputs, args.n, args.repeats, same_inputs)
                reference = NEURAL_TANGENTS_MS.get((width, outputs))
                row["neural_tangents_ms"] = reference
                results.append(row)
                ratio = f"  ({row['median_ms'] / reference:.2f}x neural-tangents' {reference} ms)" if reference else ""
                print(
                    f"W={width:5d} O={outputs:4d} x2={row['x2']:12s}: median {row['median_ms']:8.2f} ms, "
                    f"min {row['min_ms']:8.2f} ms{ratio}"
                )
    if args.json:
        with open(args.json, "w") as file:
            json.dump(results, file, indent=2)


if __name__ == "__main__":
    main()
