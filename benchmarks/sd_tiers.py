"""The fast tier of a rolled structured program: which LLVM level it takes, and what each level costs.

Per model (torchvision, ``num_classes=10``, eval, float32, 32×32, N = 2, ``x2 = x1``, ``trace_axes=()``) and mode,
in a fresh process: the conversion (onnx-jax), then the whole structured program as the zoo compiles it (loops'
convolutions in XLA:CPU's fast layout) lowered once and compiled at both fast-tier levels (LLVM O0 and O1, classic
fusion emitters), each run 1 + 3 times (median of the 3 warm runs). Recorded beside them: the level
``compile_tiers.fast_options`` chooses, XLA's flops, the loops' factor (``compile_tiers.loop_factor``: how many
times more operations run than the program holds) and the level XLA's flops alone would have chosen (the code
before that factor). ``mode``: ``rolled`` (runs of at least 6 identical blocks in one ``lax.scan``, dense
convolutions included: the default) or ``unrolled`` (``torchntk.converters.api.ROLL_BLOCKS = False``).

Writes ``results/sd_tiers.json``.

Run: ``python benchmarks/sd_tiers.py [--models resnet152 efficientnet_b5] [--timeout 900]``
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

OUT = RESULTS / "sd_tiers.json"
MODELS = ("resnet50", "resnet152", "efficientnet_b5", "efficientnet_v2_l", "convnext_small")
MODES = ("rolled", "unrolled")
LEVELS = (0, 1)


def child(name: str, mode: str) -> dict:
    import numpy as np
    import torch
    import torchvision
    from zoo import lowered_program

    from torchntk.bridge.compile_tiers import O1_FROM_FLOPS_PER_OPERATION, fast_options, loop_factor, xla_cost
    from torchntk.converters import api, to_jax
    from torchntk.converters.compile_cache import CLASSIC_FUSION_EMITTERS

    api.ROLL_BLOCKS = mode == "rolled"
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    row: dict = {"model": name, "mode": mode, "load_before": load_average()}
    start = time.perf_counter()
    converted = to_jax(model, x, route="onnx-jax")
    row["convert_s"], row["loops"] = time.perf_counter() - start, converted.loops
    lowered, args, row["lower_s"] = lowered_program(converted, x)
    text = lowered.as_text()
    operations = text.count("stablehlo.")
    row["stablehlo_ops"], row["convolutions"] = operations, text.count("stablehlo.convolution")
    start = time.perf_counter()
    row["loop_factor"] = loop_factor(lowered)
    row["loop_factor_s"] = time.perf_counter() - start  # what counting the loops adds to choosing the tier
    row["xla_flops"] = xla_cost(lowered).get("flops", 0.0)
    row["chosen_level"] = fast_options(lowered)["xla_backend_optimization_level"]
    # what XLA's flops alone chose (before loop_factor): convolutional programs here, all of them
    row["level_without_loop_factor"] = int(
        row["xla_flops"] / operations >= O1_FROM_FLOPS_PER_OPERATION["convolutional"]
    )
    kernels = []
    for level in LEVELS:
        start = time.perf_counter()
        compiled = lowered.compile({"xla_backend_optimization_level": level, **CLASSIC_FUSION_EMITTERS})
        row[f"compile_O{level}_s"] = time.perf_counter() - start
        kernel, row[f"first_run_O{level}_s"], row[f"run_O{level}_s"] = compiled_run_seconds(compiled, args)
        kernels.append(np.asarray(kernel))
        del compiled
    row["kernel_sum"] = float(kernels[0].astype(np.float64).sum())
    scale = float(np.abs(kernels[0]).max()) or 1.0
    row["levels_agree_to"] = float(np.abs(kernels[0] - kernels[1]).max()) / scale
    row["load_after"] = load_average()
    return row


def run_child(name: str, mode: str, timeout: float) -> dict:
    return model_mode_child(__file__, name, mode, timeout, "SD-TIERS ")


def table(rows: list[dict]) -> str:
    header = ["model", "mode", "ops", "loop factor", "level chosen (before)", "lower s"]
    header += ["O0 compile / run s", "O1 compile / run s"]
    body = []
    for r in rows:
        if "failure" in r:
            body.append([r["model"], r["mode"], f"failed: {r['failure']}", "", "", "", "", ""])
            continue
        levels = [f"{r[f'compile_O{lv}_s']:.1f} / {r[f'run_O{lv}_s']:.2f}" for lv in LEVELS]
        chosen = f"O{r['chosen_level']} (O{r['level_without_loop_factor']})"
        body.append(
            [r["model"], r["mode"], r["stablehlo_ops"], f"{r['loop_factor']:.2f}", chosen, f"{r['lower_s']:.1f}"]
            + levels
        )
    return markdown_table(header, body)


def main() -> None:
    parser = model_mode_parser(__doc__, MODELS, MODES, OUT)
    args = parser.parse_args()
    if args.child:
        print("SD-TIERS " + json.dumps(child(*args.child)), flush=True)
        return
    rows = []
    for name in args.models:
        for mode in args.modes:
            rows.append(run_child(name, mode, args.timeout))
            print(json.dumps(rows[-1]), flush=True)
    write_json(args.out, {"machine": machine(), "rows": rows})
    print(table(rows))


if __name__ == "__main__":
    main()
