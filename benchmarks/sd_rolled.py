"""Repeated blocks rolled into one loop (issue 11 item 4): structured derivatives' first call, rolled vs unrolled.

Per model (torchvision, ``num_classes=10``, eval, float32, 32×32, N = 2, ``x2 = None``, ``trace_axes=()``) and mode,
a fresh process with an empty ``TORCHNTK_CACHE_DIR`` runs one ``torchntk.ntk`` call and reports its seconds:

* ``sd_rolled``: structured derivatives as they are — the onnx-jax route runs a network's repeated blocks as one
  ``lax.scan`` and the structured program keeps it rolled (:mod:`torchntk.bridge.rolled_scans`);
* ``sd_unrolled``: the same with rolling off (``torchntk.converters.api.ROLL_BLOCKS = False``): the code before;
* ``nvp``: NTK-vector products' first call (issue 11's target: SD's first call on convnext_small at most NVP's).

Also the conversion's stage timings, the runs the route rolled (node, period, repetitions), the number of
equations of the structured program's jaxpr (ingredients and contraction, traced once more after the call), and the
kernel's sum (rolled and unrolled must agree). The modes alternate over ``--repeats`` rounds; the table gives
medians. The 12-layer ViT is ``vit_b_16`` with ``image_size=32``. Writes ``results/sd_rolled.json``.

Run: ``nice -n 10 python benchmarks/sd_rolled.py [--models convnext_small vit_b_16] [--repeats 2]``
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time

from _common import RESULTS, load_average, machine, markdown_table, model_mode_child, model_mode_parser, write_json

OUT = RESULTS / "sd_rolled.json"
MODELS = ("resnet18", "resnet50", "efficientnet_b0", "convnext_tiny", "convnext_small", "vit_b_16")
MODES = ("sd_rolled", "sd_unrolled", "nvp")


def child(name: str, mode: str) -> dict:
    import torch
    import torchvision

    import torchntk
    from torchntk.converters import api

    api.ROLL_BLOCKS = mode != "sd_unrolled"
    torch.manual_seed(0)
    extra = {"image_size": 32} if name.startswith("vit") else {}
    model = torchvision.models.get_model(name, weights=None, num_classes=10, **extra).eval()
    x = torch.randn(2, 3, 32, 32)
    implementation = "ntk_vector_products" if mode == "nvp" else "structured_derivatives"
    start = time.perf_counter()
    kernel = torchntk.ntk(model, x, implementation=implementation)
    row = {"model": name, "mode": mode, "call_s": time.perf_counter() - start}
    row["kernel_sum"] = float(kernel.double().sum())
    row["kernel_abs_max"] = float(kernel.double().abs().max())
    if mode != "nvp":
        row |= _program_facts(model, x)
    return row


def _program_facts(model, x) -> dict:
    """The conversion's stage timings, the rolled runs, and the structured program's size (jaxpr equations)."""
    import jax
    import jax.numpy as jnp

    from torchntk._problem import prepare
    from torchntk.bridge import torch_glue

    problem = prepare(model, x, None, params=None, trace_axes=(), diagonal_axes=())
    converted = torch_glue.convert(problem)
    facts: dict = {"timings": dict(converted.timings)}
    ingredients_fn, contraction_fn = torch_glue._parts(problem, converted)
    ingredients_fn = torch_glue._fast_convolutions(problem, converted, ingredients_fn)  # as torchntk compiles it
    inputs = (jnp.asarray(x.numpy()),)
    params = {name: jnp.asarray(value.detach().numpy()) for name, value in problem.params.items()}
    ingredients = jax.make_jaxpr(ingredients_fn)(inputs, params)
    facts["ingredients_eqns"] = _count(ingredients.jaxpr)
    side = jax.eval_shape(ingredients_fn, inputs, params)
    facts["contraction_eqns"] = _count(jax.make_jaxpr(contraction_fn)(side, side).jaxpr)
    facts["scans"] = sum(1 for e in ingredients.jaxpr.eqns if e.primitive.name == "scan")
    return facts


def _count(jaxpr) -> int:
    """Equations, nested bodies included (a scan's body counted once)."""
    total = 0
    for eqn in jaxpr.eqns:
        total += 1
        for value in eqn.params.values():
            inner = getattr(value, "jaxpr", value)
            if hasattr(inner, "eqns"):
                total += _count(inner)
    return total


def run_child(name: str, mode: str, timeout: float) -> dict:
    with tempfile.TemporaryDirectory() as cache:  # an empty cache: a user's first call
        return model_mode_child(__file__, name, mode, timeout, "SD-ROLLED ", os.environ | {"TORCHNTK_CACHE_DIR": cache})


def table(rows: list[dict]) -> str:
    header = ["model", "mode", "runs", "first call s (median)", "ingredients / contraction eqns", "kernel sum"]
    body = []
    for name in dict.fromkeys(r["model"] for r in rows):
        for mode in MODES:
            mine = [r for r in rows if r["model"] == name and r["mode"] == mode]
            good = [r for r in mine if "failure" not in r]
            if not mine:
                continue
            if not good:
                body.append([name, mode, len(mine), mine[-1]["failure"], "", ""])
                continue
            calls = statistics.median(r["call_s"] for r in good)
            size = f"{good[-1]['ingredients_eqns']} / {good[-1]['contraction_eqns']}" if mode != "nvp" else ""
            body.append([name, mode, len(good), f"{calls:.1f}", size, f"{good[-1]['kernel_sum']:.6g}"])
    return markdown_table(header, body)


def main() -> None:
    parser = model_mode_parser(__doc__, MODELS, MODES, OUT)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    if args.child:
        print("SD-ROLLED " + json.dumps(child(*args.child)), flush=True)
        return
    rows, load_before, start = [], load_average(), time.time()
    for name in args.models:
        for _ in range(args.repeats):
            for mode in args.modes:
                rows.append(run_child(name, mode, args.timeout) | {"load_average": load_average()})
                print(json.dumps(rows[-1])[:400], flush=True)
                payload = {"benchmark": "sd_rolled", "description": __doc__.split("\n\n")[1], "rows": rows}
                payload |= {"machine": machine(), "load_average_before": load_before}
                payload |= {"load_average_after": load_average(), "wall_s": time.time() - start}
                write_json(args.out, payload | {"table_markdown": table(rows)})
    print(table(rows))


if __name__ == "__main__":
    main()
