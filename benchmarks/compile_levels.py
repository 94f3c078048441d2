"""A short structured call's XLA:CPU options: LLVM O0 against O1, with XLA's MLIR fusion emitters (its default) and
with its classic ones, compile and run, per model (``results/compile_levels.json``).

For each ``model:N:size`` the whole structured program of ``torchntk.ntk(model, x)`` (``x2=None``, N examples,
onnx-jax route, 10 classes) is lowered once and compiled with each option set in this process (``O0``, ``O1``:
the level with the default emitters; ``O0 classic``, ``O1 classic``: with ``xla_cpu_use_fusion_emitters=False``;
``--optimised`` adds XLA's default level both ways), each run twice. With each row: XLA's cost analysis of the
lowered program (flops, bytes accessed), its StableHLO operation count, each executable's temporary buffers
(``temp_bytes``, XLA's memory analysis) and the level ``compile_tiers.fast_options``
picks. What ``compile_tiers.O1_FROM_FLOPS_PER_OPERATION`` was chosen from (O1 pays where the first call, compile +
run, at O1 is the shorter) and ``compile_cache.CLASSIC_FUSION_EMITTERS`` measured by.

    python benchmarks/compile_levels.py resnet18:16:32 densenet121:2:32 ...
"""

from __future__ import annotations

import argparse
import json
import time

from _common import RESULTS, load_average, machine, write_json

from torchntk.converters.compile_cache import CLASSIC_FUSION_EMITTERS as CLASSIC

OUT = RESULTS / "compile_levels.json"
LEVELS = (0, 1)
CONFIGS = {
    **{f"O{level}": {"xla_backend_optimization_level": level} for level in LEVELS},
    **{f"O{level} classic": {"xla_backend_optimization_level": level, **CLASSIC} for level in LEVELS},
}
OPTIMISED = {"default": {}, "default classic": CLASSIC}


def _model(name: str, size: int):
    import torch
    import torchvision

    torch.manual_seed(0)
    if name == "fcn":  # the paper's FCN, depth 3, W = 1024, 100 outputs
        layers = [torch.nn.Flatten(), torch.nn.Linear(3 * size * size, 1024), torch.nn.ReLU()]
        layers += [torch.nn.Linear(1024, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 100)]
        return torch.nn.Sequential(*layers).eval()
    extra = {"image_size": size} if name.startswith("vit") else {}
    return getattr(torchvision.models, name)(weights=None, num_classes=10, **extra).eval()


def measure(name: str, n: int, size: int, configs: dict[str, dict]) -> dict:
    import jax
    import jax.numpy as jnp
    import torch

    from torchntk.bridge import structured_ntk_fn
    from torchntk.bridge.compile_tiers import fast_options
    from torchntk.converters import to_jax

    x = torch.randn(n, 3, size, size)
    converted = to_jax(_model(name, size), x, route="onnx-jax")

    def batched(params, inputs):
        return jax.vmap(lambda *example: converted.fn(params, *example))(*inputs)

    inputs = (jnp.asarray(x.numpy()),)
    ntk_fn = structured_ntk_fn(batched)
    start = time.perf_counter()
    lowered = jax.jit(lambda a, p: ntk_fn(a, None, p)).lower(inputs, converted.params)
    row = {"model": name, "n": n, "size": size, "lower_s": time.perf_counter() - start}
    cost = lowered.cost_analysis()
    row |= {"flops": cost.get("flops"), "bytes": cost.get("bytes accessed")}
    text = lowered.as_text()
    row["operations"], row["convolutions"] = text.count("stablehlo."), text.count("stablehlo.convolution")
    chosen = fast_options(lowered)
    row["chosen_level"] = chosen["xla_backend_optimization_level"]
    row["chosen_config"] = next((config for config, options in CONFIGS.items() if options == chosen), repr(chosen))
    for config, options in configs.items():
        start = time.perf_counter()
        compiled = lowered.compile(options)
        entry = {"compile_s": time.perf_counter() - start, "runs_s": []}
        memory = compiled.memory_analysis()  # XLA's buffer plan: the fusions each emitter makes differ
        entry["temp_bytes"] = getattr(memory, "temp_size_in_bytes", None)
        for _ in range(2):
            start = time.perf_counter()
            jax.block_until_ready(compiled(inputs, converted.params))
            entry["runs_s"].append(time.perf_counter() - start)
        entry["first_call_s"] = entry["compile_s"] + entry["runs_s"][0]
        row[config] = entry
        del compiled
    row["best_level"] = min(LEVELS, key=lambda level: row[f"O{level}"]["first_call_s"])
    row["best_config"] = min(configs, key=lambda config: row[config]["first_call_s"])
    row["load_average"] = load_average()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cases", nargs="+", help="model:N:size")
    parser.add_argument("--optimised", action="store_true", help="also XLA's default level, both emitters")
    args = parser.parse_args()
    configs = CONFIGS | (OPTIMISED if args.optimised else {})
    data = json.loads(OUT.read_text()) if OUT.exists() else {"rows": []}
    data["machine"] = machine()
    for case in args.cases:
        name, n, size = case.split(":")
        row = measure(name, int(n), int(size), configs)
        data["rows"] = [r for r in data["rows"] if (r["model"], r["n"], r["size"]) != (name, int(n), int(size))]
        data["rows"].append(row)
        print(json.dumps(row), flush=True)
        write_json(OUT, data)


if __name__ == "__main__":
    main()
