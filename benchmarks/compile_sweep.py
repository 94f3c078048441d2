"""What the first structured call compiles, for the whole zoo under one code: the points of auto's compile-time model.

Per torchvision builder (``weights=None``, ``num_classes=10``, eval, float32, the zoo's smallest accepted square
input, N = 2, ``x2 = x1``), in a fresh process with empty caches: the conversion (onnx-jax; ``zoo.py`` times it
with the check beside the compile), then the structured program traced and compiled exactly as the zoo's onnx-jax
stage does it (``zoo.structured_program``: torchntk's first-call tier and layout). Recorded: ``lower_s``,
``compile_s``, StableHLO operations, the tier, whether blocks were rolled, and the 1-minute load average as the
tracing starts.

The zoo's own rows were measured at several stops, under different code (before the fast tier, before rolling), so
a compile-time model fitted to them carries that spread as its cover factor. ``calibrate_auto.py --compile`` fits
to this file's rows where it has them. Writes ``results/compile_sweep.json`` after every model (resumable: models
recorded are skipped unless ``--redo``).

Run: ``nice -n 10 python benchmarks/compile_sweep.py [--models resnet18 ...] [--timeout 600] [--redo]``
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time

from _common import RESULTS, load_average, model_mode_child, model_mode_parser, write_json

OUT = RESULTS / "compile_sweep.json"
MODES = ("default",)


def child(name: str) -> dict:
    import warnings

    from zoo import _build, structured_program

    from torchntk.converters import to_jax

    warnings.simplefilter("ignore")
    model, x, size = _build(name)
    start = time.perf_counter()
    converted = to_jax(model, x, route="onnx-jax")
    row = {"model": name, "size": size, "convert_s": time.perf_counter() - start, "loops": converted.loops}
    load = load_average()  # the conversion's check has just finished: the load XLA's compile sees
    program, _, _ = structured_program(converted, x)
    return row | program | {"load_average": load}


def main() -> None:
    parser = model_mode_parser(__doc__, (), MODES, OUT)
    parser.add_argument("--redo", action="store_true")
    args = parser.parse_args()
    if args.child:
        print("SWEEP-RESULT " + json.dumps(child(args.child[0])), flush=True)
        return
    zoo = json.loads((RESULTS / "zoo.json").read_text())["models"]
    # the builders the zoo converts through onnx-jax (a failed conversion has no program to time), fewest parameters
    # first, as the zoo runs them
    names = args.models or sorted(
        (n for n, e in zoo.items() if "compile_s" in e.get("onnx-jax", {})), key=lambda n: zoo[n]["params"]
    )
    data = json.loads(args.out.read_text()) if args.out.exists() else {"rows": {}}
    for name in names:
        if name in data["rows"] and not args.redo:
            continue
        with tempfile.TemporaryDirectory() as cache:  # empty caches: nothing converted or compiled before
            env = dict(os.environ, TORCHNTK_CACHE_DIR=cache)
            row = model_mode_child(__file__, name, "default", args.timeout, "SWEEP-RESULT ", env)
        data["rows"][name] = row
        write_json(args.out, data)
        print(name, {k: row.get(k) for k in ("lower_s", "compile_s", "compile_tier", "loops", "failure")}, flush=True)
    sys.exit(0)


if __name__ == "__main__":
    main()
