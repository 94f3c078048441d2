"""XLA:CPU's convolution against the product of its patches, on resnet18's convolutions at small inputs.

For each convolution of resnet18 (stem, the stages' 3×3 and strided 3×3, the 1×1 projections) at input sizes 32,
64, 96 and 128, a batch of 32 rows (the structured program's cotangent rows), float32: the forward convolution and
the derivative with respect to its input (what structured derivatives pull cotangents back through), each jitted
as ``lax.conv_general_dilated`` and as :func:`torchntk.converters.patch_convolutions.patch_convolution`, side by
side in one process, the median of 5 warm runs; multiply-adds per second beside each. ``rewritten`` says whether
torchntk's rule (:func:`~torchntk.converters.patch_convolutions.is_small`) takes the patches for it.

Run: ``python benchmarks/patch_convolutions.py`` (about 2 minutes). Writes ``results/patch_convolutions.json``.
"""

from __future__ import annotations

import statistics
import time

import _common as c

# (in channels, out channels, kernel, stride, input size as a fraction of the image: R // divisor)
CONVOLUTIONS = [
    (3, 64, 7, 2, 1),
    (64, 64, 3, 1, 4),
    (64, 128, 3, 2, 4),
    (128, 128, 3, 1, 8),
    (64, 128, 1, 2, 4),
    (128, 256, 3, 2, 8),
    (256, 256, 3, 1, 16),
    (128, 256, 1, 2, 8),
    (256, 512, 3, 2, 16),
    (512, 512, 3, 1, 32),
    (256, 512, 1, 2, 16),
]
SIZES = (32, 64, 96, 128)
ROWS = 32


def _median_s(fn, *args) -> float:
    fn(*args).block_until_ready()
    times = []
    for _ in range(5):
        start = time.perf_counter()
        fn(*args).block_until_ready()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure() -> list[dict]:
    import jax
    import jax.numpy as jnp
    from jax import lax

    from torchntk.converters.patch_convolutions import is_small, patch_convolution

    points = []
    for cin, cout, k, stride, divisor in CONVOLUTIONS:
        for size in SIZES:
            side = size // divisor
            x, w = jnp.ones((ROWS, cin, side, side)), jnp.ones((cout, cin, k, k)) * 0.01

            def conv(x, w, stride=stride, k=k):
                dn = ("NCHW", "OIHW", "NCHW")
                return lax.conv_general_dilated(x, w, (stride,) * 2, [(k // 2, k // 2)] * 2, dimension_numbers=dn)

            (eqn,) = jax.make_jaxpr(conv)(x, w).jaxpr.eqns

            def patches(x, w, params=eqn.params):
                return patch_convolution(x, w, **params)

            y = conv(x, w)
            g = jnp.ones_like(y)
            macs = ROWS * cout * y.shape[2] * y.shape[3] * cin * k * k
            point = {"cin": cin, "cout": cout, "kernel": k, "stride": stride, "R": size, "side": side}
            point["rewritten"] = is_small(eqn.params, x.shape, w.shape)
            for name, fn in (("convolution", conv), ("patches", patches)):
                forward = jax.jit(fn)
                backward = jax.jit(lambda x, w, g, fn=fn: jax.vjp(lambda x: fn(x, w), x)[1](g)[0])
                point[f"{name}_forward_s"] = _median_s(forward, x, w)
                point[f"{name}_input_derivative_s"] = _median_s(backward, x, w, g)
            point["gmacs_per_second"] = {
                key: macs / point[key] / 1e9 for key in point if key.endswith("_s") and isinstance(point[key], float)
            }
            points.append(point)
            ms = {key: f"{point[key] * 1e3:.1f}" for key in point if key.endswith("_s")}
            print(
                f"{cin}->{cout} {k}x{k}/{stride} R={size} ({side}x{side}): conv {ms['convolution_forward_s']} / "
                f"{ms['convolution_input_derivative_s']} ms, patches {ms['patches_forward_s']} / "
                f"{ms['patches_input_derivative_s']} ms{' (rewritten)' if point['rewritten'] else ''}",
                flush=True,
            )
    return points


def table(points: list[dict]) -> str:
    rows = [
        (
            f"{p['cin']}→{p['cout']} {p['kernel']}×{p['kernel']}/{p['stride']}",
            p["R"],
            f"{p['side']}×{p['side']}",
            c.fmt_ms(p["convolution_forward_s"]),
            c.fmt_ms(p["patches_forward_s"]),
            c.fmt_ms(p["convolution_input_derivative_s"]),
            c.fmt_ms(p["patches_input_derivative_s"]),
            "yes" if p["rewritten"] else "",
        )
        for p in points
    ]
    header = [
        "convolution",
        "R",
        "input",
        "conv fwd ms",
        "patches fwd ms",
        "conv d/dx ms",
        "patches d/dx ms",
        "rewritten",
    ]
    return c.markdown_table(header, rows)


def main() -> dict:
    before = c.load_average()
    start = time.perf_counter()
    points = measure()
    payload = {
        "benchmark": "patch_convolutions",
        "description": __doc__,
        "machine": c.machine(),
        "load_average_before": before,
        "load_average_after": c.load_average(),
        "wall_s": time.perf_counter() - start,
        "rows": ROWS,
        "points": points,
        "table_markdown": table(points),
    }
    c.write_json(c.RESULTS / "patch_convolutions.json", payload)
    print(payload["table_markdown"])
    return payload


if __name__ == "__main__":
    main()
