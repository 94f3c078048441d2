"""neural-tangents 0.6.5's ``empirical_ntk_fn`` on the anchor FCN, run by ``anchors.py`` inside /work/nt-venv.

Imports only the standard library, JAX and neural-tangents (its venv has no torch). Model: ``nt.stax`` Dense(W, no
bias, W_std=1, NTK parameterisation) + Relu, ``depth`` times, then Dense(O); inputs ``(N, in_dim)``, float32, jit,
``trace_axes=()``, ``vmap_axes=0``. Prints one JSON line: compile (first call) time, the peak RSS of one warm call
and the RSS before it, then the median of ≥ 5 runs (≥ 0.5 s in total) unless one call exceeds the budget.

Usage: ``/work/nt-venv/bin/python benchmarks/_nt_child.py '{"W": 512, "O": 10, "N": 8, "depth": 3, "in_dim": 512,
"implementation": 3, "budget_s": 10}'``
"""

from __future__ import annotations

import json
import math
import statistics
import sys
import time

import _common as c


def main(spec: dict) -> dict:
    import jax
    import neural_tangents as nt
    from neural_tangents import stax

    layers = []
    for _ in range(spec["depth"]):
        layers += [stax.Dense(spec["W"]), stax.Relu()]
    init_fn, apply_fn, _ = stax.serial(*layers, stax.Dense(spec["O"]))
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
    x1 = jax.random.normal(k1, (spec["N"], spec["in_dim"]))
    x2 = None if spec.get("x2_none") else jax.random.normal(k2, (spec["N"], spec["in_dim"]))
    _, params = init_fn(k3, x1.shape)
    kernel_fn = jax.jit(
        nt.empirical_ntk_fn(
            apply_fn, trace_axes=(), vmap_axes=0, implementation=nt.NtkImplementation(spec["implementation"])
        )
    )

    def call():
        return kernel_fn(x1, x2, params).block_until_ready()

    result = c.measure_calls(lambda: None, call, spec["budget_s"])
    result["compile_s"] = result["first_call_s"] - result.get("warm_call_s", 0.0)
    result["jax"] = jax.__version__
    result["neural_tangents"] = nt.__version__
    if result["status"] == "ok":
        runs = max(c.MIN_REPEATS, min(c.MAX_REPEATS, math.ceil(c.MIN_TOTAL_S / max(result["warm_call_s"], 1e-4))))
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            call()
            times.append(time.perf_counter() - start)
        result.update(median_s=statistics.median(times), min_s=min(times), runs=runs)
    return result


if __name__ == "__main__":
    print(json.dumps(main(json.loads(sys.argv[1]))))
