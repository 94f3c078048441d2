"""What XLA compiles for structured derivatives (issue 11 item 4): the two programs, grouped vs one per use pair.

Per model (torchvision, ``num_classes=10``, eval, float32, 32×32, N = 2, ``x2 = None``, ``trace_axes=()``), in a
fresh process per (model, mode): the conversion, then the ingredients program (cotangents and sub-arrays of a chunk)
and the contraction program (every pair of uses of a parameter, MJJMP), each traced/lowered, compiled and run
(median of 3 warm runs), with the lowered program's size in lines of StableHLO. ``mode``:

* ``grouped``: torchntk as it is — pairs of uses with the same structures and shapes are stacked into one
  contraction (``structured.same_contractions``);
* ``ungrouped``: one contraction per pair of uses (the code before grouping, by replacing ``same_contractions``);
* ``unrolled``: grouped, but with the onnx-jax route's rolling of repeated blocks off
  (``torchntk.converters.api.ROLL_BLOCKS = False``): every block its own equations, as before rolling. ``grouped``
  has them rolled into one ``lax.scan`` per run, kept rolled by the interpreter (:mod:`torchntk.bridge.rolled_scans`).

The 12-layer ViT is torchvision's ``vit_b_16`` built with ``image_size=32`` (2×2 patches). Writes
``results/sd_compile.json``.

Run: ``python benchmarks/sd_compile.py [--models resnet18 convnext_small] [--timeout 900]``
"""

from __future__ import annotations

import json
import time

from _common import (
    RESULTS,
    compiled_run_seconds,
    load_average,
    machine,
    markdown_table,
    model_mode_child,
    model_mode_parser,
    write_json,
)

OUT = RESULTS / "sd_compile.json"
MODELS = ("resnet18", "resnet50", "efficientnet_b0", "convnext_tiny", "convnext_small", "vit_b_16")
MODES = ("grouped", "ungrouped", "unrolled")


def child(name: str, mode: str) -> dict:
    import jax
    import jax.numpy as jnp
    import torch
    import torchvision

    from torchntk._problem import prepare
    from torchntk.bridge import structured, torch_glue
    from torchntk.converters import api

    api.ROLL_BLOCKS = mode != "unrolled"
    if mode == "ungrouped":
        grouping = structured.same_contractions
        structured.same_contractions = lambda *a: [[pair] for pairs in grouping(*a) for pair in pairs]
    torch.manual_seed(0)
    extra = {"image_size": 32} if name.startswith("vit") else {}
    model = torchvision.models.get_model(name, weights=None, num_classes=10, **extra).eval()
    x = torch.randn(2, 3, 32, 32)
    problem = prepare(model, x, None, params=None, trace_axes=(), diagonal_axes=())
    row: dict = {"model": name, "mode": mode, "params": sum(p.numel() for p in model.parameters())}
    start = time.perf_counter()
    converted = torch_glue.convert(problem)
    row["convert_s"] = time.perf_counter() - start
    ingredients_fn, contraction_fn = torch_glue._parts(problem, converted)
    ingredients_fn = torch_glue._fast_convolutions(problem, converted, ingredients_fn)  # as torchntk compiles it
    inputs = (jnp.asarray(x.numpy()),)
    params = {name: jnp.asarray(value.detach().numpy()) for name, value in problem.params.items()}

    def program(label: str, fn, args: tuple):
        start = time.perf_counter()
        lowered = jax.jit(fn).lower(*args)
        row[f"{label}_lower_s"] = time.perf_counter() - start
        row[f"{label}_hlo_lines"] = lowered.as_text().count("\n")
        start = time.perf_counter()
        compiled = lowered.compile()
        row[f"{label}_compile_s"] = time.perf_counter() - start
        result, _, row[f"{label}_run_s"] = compiled_run_seconds(compiled, args)
        return result

    side = program("ingredients", ingredients_fn, (inputs, params))
    kernel = program("contraction", contraction_fn, (side, side))
    row["uses"] = len(side.info.uses)
    row["contractions"] = len(
        structured.same_contractions(side, side, [c[0] for c in side.cts], [c[0] for c in side.cts])
    )
    row["kernel_sum"] = float(jnp.sum(kernel))
    return row


def run_child(name: str, mode: str, timeout: float) -> dict:
    return model_mode_child(__file__, name, mode, timeout, "SD-COMPILE ")


def table(rows: list[dict]) -> str:
    header = ["model", "mode", "uses", "contractions", "convert s", "ingredients lower / compile / run s"]
    header += ["contraction lower / compile / run s", "contraction HLO lines"]
    body = []
    for r in rows:
        if "failure" in r:
            body.append([r["model"], r["mode"], r["failure"], "", "", "", "", ""])
            continue
        parts = {
            label: f"{r[f'{label}_lower_s']:.1f} / {r[f'{label}_compile_s']:.1f} / {r[f'{label}_run_s']:.3f}"
            for label in ("ingredients", "contraction")
        }
        body.append(
            [
                r["model"],
                r["mode"],
                r["uses"],
                r["contractions"],
                f"{r['convert_s']:.1f}",
                parts["ingredients"],
                parts["contraction"],
                r["contraction_hlo_lines"],
            ]
        )
    return markdown_table(header, body)


def main() -> None:
    parser = model_mode_parser(__doc__, MODELS, MODES, OUT)
    args = parser.parse_args()
    if args.child:
        print("SD-COMPILE " + json.dumps(child(*args.child)), flush=True)
        return
    rows, load_before, start = [], load_average(), time.time()
    for name in args.models:
        for mode in args.modes:
            rows.append(run_child(name, mode, args.timeout))
            print(json.dumps(rows[-1])[:400], flush=True)
            payload = {"benchmark": "sd_compile", "description": __doc__.split("\n\n")[1], "rows": rows}
            payload |= {"machine": machine(), "load_average_before": load_before, "load_average_after": load_average()}
            payload |= {"wall_s": time.time() - start, "table_markdown": table(rows)}
            write_json(args.out, payload)
    print(table(rows))


if __name__ == "__main__":
    main()
