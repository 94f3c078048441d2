"""The whole torchvision classification zoo through both conversion routes, structured derivatives and auto.

Every builder of ``torchvision.models.list_models(module=torchvision.models)`` (``weights=None``, ``num_classes=10``,
eval mode, float32) at the smallest accepted square input among ``SIZES``, N = 2 examples, ``x2 = None``:

* ``ref``: NTK-vector products' kernel (the reference; its first-call seconds recorded), summed over groups of
  parameters where one pair needs more memory than the machine has (``parameter_groups``),
* ``onnx-jax`` / ``onnx-tf``: ``to_jax_while_checking(route=...)`` from an empty cache (conversion seconds, ONNX
  export included, up to the body), the structured NTK function compiled in the body
  (``jax.jit(...).lower(...).compile()``, compile seconds) while the conversion's check runs beside it, as
  torchntk's call does (``check_wait_s``: what it added after the compile), the first call as one span
  (``first_call_s``), its first and median-of-3 warm run seconds, and the kernel's relative error against the
  reference,
* ``auto``: ``torchntk.ntk(model, x)`` in a fresh process and empty cache (what a user's first call costs, which
  method auto picked, and the kernel's error).

Each (model, stage) runs in its own subprocess with a timeout and a resident-memory limit, so one hang or blow-up
does not stop the sweep; results are written to ``results/zoo.json`` after every stage (resumable: stages already
recorded are skipped unless ``--redo``). Models run in order of parameter count. ``--table`` prints the README table
from the JSON.

Run: ``nice -n 10 python benchmarks/zoo.py [--models resnet18 ...] [--stages ref onnx-jax auto onnx-tf]
[--timeout 120] [--memory-gb 5] [--ref-memory-gb 14] [--retry-failed] [--redo-above-load 4] [--pause-file F]``
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import RESULTS, load_average, markdown_table, rss_bytes, write_json  # noqa: F401 (rss_bytes: child)

OUT = RESULTS / "zoo.json"
SIZES = (32, 64, 75, 96, 128, 160, 224, 299)
STAGES = ("ref", "onnx-jax", "auto", "onnx-tf")
TOLERANCE = 1e-3  # float32 kernels: relative max error against the reference
HERE = Path(__file__).resolve().parent


# ------------------------------------------------------------------------------------------------------ child side


def _build(name: str):
    import torch
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, num_classes=10).eval()
    for size in SIZES:
        x = torch.randn(2, 3, size, size)
        try:
            with torch.no_grad():
                out = model(x)
        except Exception:  # noqa: BLE001 - too small for this architecture: try the next size
            continue
        if isinstance(out, torch.Tensor):
            return model, x, size
    raise RuntimeError(f"no square input size in {SIZES} gives a single tensor output")


def _rel_error(kernel, reference) -> float:
    import numpy as np

    kernel, reference = np.asarray(kernel, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    if kernel.shape != reference.shape:
        return float("inf")
    return float(np.abs(kernel - reference).max() / (np.abs(reference).max() + 1e-30))


def _parameter_groups(model, count: int) -> list[list[str]]:
    """The model's parameters in ``count`` groups of about equal size (largest first, each to the smallest group)."""
    sizes, groups = [0] * count, [[] for _ in range(count)]
    for name, p in sorted(model.named_parameters(), key=lambda item: -item[1].numel()):
        smallest = sizes.index(min(sizes))
        sizes[smallest] += p.numel()
        groups[smallest].append(name)
    return [names for names in groups if names]


def _child_budget() -> int | None:
    """The child's memory cap, not the machine's free memory, is what torchntk may plan with: 70% of it for the
    tiles (the process itself holds torch, JAX and the model, ~2 GB; a quarter of it had left NVP out of auto)."""
    return int(os.environ["ZOO_MAX_MEMORY"]) if "ZOO_MAX_MEMORY" in os.environ else None


def _stage_ref(model, x, work: Path) -> dict:
    """NTK-vector products' kernel. Where one pair of it needs more memory than this machine has (models of
    100M+ parameters), the sum of its kernels over groups of parameters: the NTK is a sum over parameters, each
    group's kernel computed by the same tested method with a fraction of the memory."""
    import numpy as np

    import torchntk

    nvp = {"implementation": "ntk_vector_products", "max_memory": _child_budget()}
    start = time.perf_counter()
    for count in (1, 2, 4, 8, 16, 32):
        try:
            if count == 1:
                kernel = torchntk.ntk(model, x, **nvp).numpy()
            else:
                kernel = sum(
                    torchntk.ntk(model, x, params=names, **nvp).double().numpy()
                    for names in _parameter_groups(model, count)
                )
            break
        except ValueError as error:  # torchntk's "max_memory ... too small for even one tile": smaller groups
            if "too small" not in str(error) or count == 32:
                raise
    np.save(work / "ref.npy", kernel)
    row = {"first_s": time.perf_counter() - start, "finite": bool(np.isfinite(kernel).all())}
    return row | ({"parameter_groups": count} if count > 1 else {})


def _stage_route(model, x, work: Path, route: str) -> dict:
    import jax
    import numpy as np

    from torchntk.converters import to_jax, to_jax_while_checking

    # As torchntk's structured call does (bridge/torch_glue.compiled_first_tile): the program is traced and compiled
    # while the conversion's check runs beside it (onnx-jax, where both fit the stage's memory budget), and awaited
    # before the first run.
    start = time.perf_counter()
    beside = route == "onnx-jax" and _check_fits_beside(model, x)
    with (
        to_jax_while_checking(model, x, route=route)
        if beside
        else contextlib.nullcontext(to_jax(model, x, route=route)) as converted
    ):
        row = {"conversion_s": time.perf_counter() - start, "timings": converted.timings}
        program, compiled, args = structured_program(converted, x)
        row |= program
    row["check_wait_s"] = converted.timings.get("check_wait", 0.0)  # what the check added after the compile
    plan = compiled.memory_analysis()  # XLA's buffer assignment: say so rather than be killed at the cap
    need = plan.temp_size_in_bytes + plan.output_size_in_bytes
    row["xla_plan_gb"] = need / 1e9
    if _child_budget() is not None and need > _child_budget():
        if route != "onnx-jax":  # torchntk's own call converts by its default route only
            raise MemoryError(f"XLA's plan of the unblocked program needs {need / 1e9:.1f} GB, over the stage's budget")
        del compiled
        return row | _blocked_call(model, x, work, row)
    run_start = time.perf_counter()
    kernel = np.asarray(compiled(*args))
    row["first_run_s"] = time.perf_counter() - run_start
    row["first_call_s"] = time.perf_counter() - start  # conversion to kernel, as one call: the check overlapped
    warm = []
    for _ in range(3):
        run_start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        warm.append(time.perf_counter() - run_start)
    row["warm_s"] = sorted(warm)[1]
    row["error"] = _rel_error(kernel, np.load(work / "ref.npy"))
    row["correct"] = row["error"] <= TOLERANCE
    return row


def lowered_program(converted, x) -> tuple[Any, tuple, float]:
    """The structured NTK function of ``converted`` on ``x`` (``x2 = x``), traced and lowered as torchntk's first
    call does it (bridge/torch_glue.compiled_first_tile; loops' convolutions in XLA:CPU's fast layout): the lowered
    program, its arguments and the seconds tracing and lowering took."""
    import jax

    from torchntk.bridge import structured_ntk_fn
    from torchntk.converters.loop_convolutions import fast_convolutions

    fn = converted.fn

    def batched(params, inputs):
        return jax.vmap(lambda *example: fn(params, *example))(*inputs)

    args = ((jax.numpy.asarray(x.numpy()),), (jax.numpy.asarray(x.numpy()),), converted.params)
    start = time.perf_counter()
    ntk_fn = structured_ntk_fn(batched)
    ntk_fn = fast_convolutions(ntk_fn) if converted.loops else ntk_fn
    lowered = jax.jit(ntk_fn).lower(*args)
    return lowered, args, time.perf_counter() - start


def structured_program(converted, x) -> tuple[dict, Any, tuple]:
    """:func:`lowered_program` compiled as torchntk's first call does it: the fast tier's LLVM level chosen from the
    lowered program (bridge/compile_tiers.py). Returns the row (``lower_s``, ``stablehlo_ops``, ``compile_s``,
    ``compile_tier``), the compiled program and its arguments."""
    from torchntk.bridge.compile_tiers import fast_options

    lowered, args, lower_s = lowered_program(converted, x)
    row = {"lower_s": lower_s, "stablehlo_ops": lowered.as_text().count("stablehlo.")}
    compile_start = time.perf_counter()
    options = fast_options(lowered)  # a short call (two examples: one tile) compiles at the fast tier
    compiled = lowered.compile(options)
    row["compile_s"] = time.perf_counter() - compile_start
    row["compile_tier"] = f"fast O{options['xla_backend_optimization_level']}"
    return row, compiled, args


def _check_fits_beside(model, x) -> bool:
    """torchntk's own rule (``torch_glue.check_fits_beside``) under the stage's memory budget."""
    from torchntk._problem import prepare
    from torchntk._tiles import TileOptions, tile_bytes
    from torchntk.bridge.memory_plan import choose_blocks
    from torchntk.bridge.torch_glue import check_fits_beside

    problem = prepare(model, x, x, params=None, trace_axes=(), diagonal_axes=())
    try:
        choice = choose_blocks(problem, TileOptions(max_memory=_child_budget()))
    except ValueError:  # the tile does not fit the budget alone
        return False
    return check_fits_beside(problem, tile_bytes(problem, choice.per_example, choice.chunk), _child_budget())


def _blocked_call(model, x, work: Path, row: dict) -> dict:
    """Where the unblocked program does not fit the stage's budget: torchntk's own structured call with that budget,
    which blocks output rows and examples to fit XLA's plan (``torch_glue.fit_to_memory``) — what a user gets.
    The unblocked program's tracing and compilation are kept as ``unblocked_*``; the call is timed twice."""
    import numpy as np

    import torchntk

    blocked = {"unblocked_" + k: row.pop(k) for k in ("lower_s", "compile_s")}
    sd = {"implementation": "structured_derivatives", "max_memory": _child_budget()}
    start = time.perf_counter()
    kernel = torchntk.ntk(model, x, **sd).numpy()
    blocked["blocked_call_s"] = time.perf_counter() - start  # its own tracing, compilation and run (converted)
    start = time.perf_counter()
    torchntk.ntk(model, x, **sd)
    blocked["warm_s"] = time.perf_counter() - start
    blocked["error"] = _rel_error(kernel, np.load(work / "ref.npy"))
    blocked["correct"] = blocked["error"] <= TOLERANCE
    return blocked


def _stage_auto(model, x, work: Path) -> dict:
    import logging

    import numpy as np

    import torchntk

    messages: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger("torchntk").addHandler(handler)
    logging.getLogger("torchntk").setLevel(logging.DEBUG)
    budget = _child_budget()
    start = time.perf_counter()
    kernel = torchntk.ntk(model, x, max_memory=budget).numpy()
    row = {"first_s": time.perf_counter() - start, "max_memory": budget}
    picked = [m for m in messages if m.startswith("auto picked")]
    row["choice"] = picked[-1].split(":")[0].removeprefix("auto picked ").strip() if picked else None
    row["error"] = _rel_error(kernel, np.load(work / "ref.npy"))
    row["correct"] = row["error"] <= TOLERANCE
    return row


def child(name: str, stage: str, work: Path) -> None:
    import warnings

    warnings.simplefilter("ignore")
    os.environ["TORCHNTK_CACHE_DIR"] = str(work / f"cache-{stage}")  # empty: a user's first call
    start = time.perf_counter()
    model, x, size = _build(name)
    row: dict = {"size": size, "params": sum(p.numel() for p in model.parameters())}
    row["build_s"] = time.perf_counter() - start
    if stage == "ref":
        row |= _stage_ref(model, x, work)
    elif stage == "auto":
        row |= _stage_auto(model, x, work)
    else:
        row |= _stage_route(model, x, work, stage)
    print("ZOO-RESULT " + json.dumps(row), flush=True)


# ----------------------------------------------------------------------------------------------------- parent side


def _run_child(name: str, stage: str, work: Path, timeout: float, memory_bytes: float) -> dict:
    """One stage in a subprocess; killed past ``timeout`` seconds or ``memory_bytes`` of resident memory."""
    command = [sys.executable, str(Path(__file__)), "--child", name, stage, str(work)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")]))
    env["ZOO_MAX_MEMORY"] = str(int(memory_bytes * 0.7))
    start = time.monotonic()
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=HERE)
        failure = None
        while proc.poll() is None:
            time.sleep(0.5)
            if time.monotonic() - start > timeout:
                failure = f"timeout ({timeout:.0f} s)"
            elif _rss(proc.pid) > memory_bytes:
                failure = f"memory (> {memory_bytes / 1e9:.1f} GB resident)"
            if failure:
                proc.kill()
                proc.wait()
        log.seek(0)
        text = log.read()
    wall = time.monotonic() - start
    for line in text.splitlines():
        if line.startswith("ZOO-RESULT "):
            return json.loads(line.removeprefix("ZOO-RESULT ")) | {"wall_s": wall}
    if failure is None:
        lines = [line for line in text.strip().splitlines() if line.strip()]
        errors = [line for line in lines if "Error" in line or "error" in line]
        failure = (errors or lines or ["exited without a result"])[-1][:300]
    return {"failure": failure, "wall_s": wall}


def _rss(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0.0


def _models() -> list[str]:
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def _param_counts(names: list[str]) -> dict[str, int]:
    import torchvision

    counts = {}
    for name in names:
        try:
            model = torchvision.models.get_model(name, weights=None, num_classes=10)
            counts[name] = sum(p.numel() for p in model.parameters())
        except Exception:  # noqa: BLE001 - counted as 0: runs first and records its own failure
            counts[name] = 0
    return counts


def _recorded(entry: dict, stage: str, redo: bool, retry_failed: bool, above_load: float | None = None) -> bool:
    """Whether ``stage`` already has a result to keep (failures are kept unless ``retry_failed``; results measured
    at a 1-minute load average above ``above_load`` are not kept)."""
    if redo or stage not in entry:
        return False
    loaded = above_load is not None and entry[stage].get("load_average", [0.0])[0] > above_load
    return not (retry_failed and "failure" in entry[stage]) and not loaded


def _wait_while_paused(pause_file: Path | None) -> None:
    """Other benchmarks may need the machine alone: while ``pause_file`` exists no new stage starts."""
    while pause_file is not None and pause_file.exists():
        time.sleep(5)


def _run_stage(data: dict, name: str, stage: str, work: Path, timeout: float, memory_bytes: float) -> None:
    """Run one stage in its own process and record it (with its memory cap and the load average) in ``data``."""
    entry = data["models"][name]
    entry[stage] = _run_child(name, stage, work, timeout, memory_bytes)
    entry[stage] |= {"memory_gb": memory_bytes / 1e9, "load_average": load_average()}
    print(name, stage, json.dumps(entry[stage])[:200], flush=True)
    write_json(OUT, data)


def sweep(
    names: list[str],
    stages: list[str],
    timeout: float,
    memory_gb: float,
    redo: bool,
    retry_failed: bool = False,
    pause_file: Path | None = None,
    above_load: float | None = None,
    ref_memory_gb: float | None = None,
) -> None:
    data = json.loads(OUT.read_text()) if OUT.exists() else {"models": {}}
    data.setdefault("models", {})
    data["settings"] = {"sizes": SIZES, "n": 2, "tolerance": TOLERANCE, "timeout_s": timeout, "memory_gb": memory_gb}
    ref_memory = (ref_memory_gb or memory_gb) * 1e9  # the reference alone may be given more (VGG's classifier)
    data["builders"] = sorted(set(data.get("builders", [])) | set(names))
    counts = _param_counts(names)
    for name in sorted(names, key=lambda n: counts[n]):
        entry = data["models"].setdefault(name, {"params": counts[name]})
        with tempfile.TemporaryDirectory(prefix=f"zoo-{name}-") as tmp:
            work = Path(tmp)
            ref_tried = False  # the reference runs at most once per model and sweep, not again for each later stage
            for stage in stages:
                if stage == "ref":
                    if not (ref_tried or _recorded(entry, "ref", redo, retry_failed)):
                        _wait_while_paused(pause_file)
                        _run_stage(data, name, "ref", work, timeout, ref_memory)
                        ref_tried = True
                    continue
                if _recorded(entry, stage, redo, retry_failed, above_load):
                    continue
                _wait_while_paused(pause_file)
                if not (work / "ref.npy").exists():  # a later stage needs the reference kernel
                    known_failure = _recorded(entry, "ref", redo, retry_failed) and "failure" in entry["ref"]
                    if not (ref_tried or known_failure):
                        _run_stage(data, name, "ref", work, timeout, ref_memory)
                        ref_tried = True
                    if "failure" in entry["ref"]:
                        entry[stage] = {"failure": "no reference kernel: " + entry["ref"]["failure"]}
                        continue
                _run_stage(data, name, stage, work, timeout, memory_gb * 1e9)
        write_json(OUT, data)


# ------------------------------------------------------------------------------------------------------- the table


def summary(data: dict) -> dict:
    models = data["models"]
    ran = {n: e for n, e in models.items() if "onnx-jax" in e or "auto" in e}
    sd_ok = [n for n, e in ran.items() if any(e.get(r, {}).get("correct") for r in ("onnx-jax", "onnx-tf"))]
    auto_ok = [n for n, e in ran.items() if e.get("auto", {}).get("correct")]
    builders = len(data.get("builders", models))
    firsts = {n: first_call(e["onnx-jax"]) for n, e in ran.items() if first_call(e.get("onnx-jax", {}))}
    within = [n for n, seconds in firsts.items() if seconds <= FIRST_CALL_TARGET_S]
    return {
        "builders": builders,
        "ran": len(ran),
        "sd_correct": len(sd_ok),
        "auto_correct": len(auto_ok),
        # auto ran the reference's own method on the reference's own terms: agreement, not an independent check
        "auto_as_reference": sum(
            models[n]["auto"].get("choice") == "ntk_vector_products" and "parameter_groups" not in models[n]["ref"]
            for n in auto_ok
        ),
        "sd_first_within_target": len(within),
        "sd_first_measured": len(firsts),
        "slowest_sd_first": sorted(firsts.items(), key=lambda item: -item[1])[:5],
    }


#: Issue 12's target for a structured-derivatives first call at 32×32 on this machine.
FIRST_CALL_TARGET_S = 60.0


def first_call(row: dict) -> float | None:
    """Seconds of the onnx-jax stage's structured first call: conversion + tracing + compilation + first run."""
    if "first_call_s" in row:  # measured as one span (the check overlaps the compile)
        return row["first_call_s"]
    parts = ("conversion_s", "lower_s", "compile_s", "first_run_s")
    if "blocked_call_s" in row:  # torchntk's blocked call (the unblocked program did not fit): conversion + call
        parts = ("conversion_s", "blocked_call_s")
    return sum(row[k] for k in parts) if all(k in row for k in parts) else None


def _cell(row: dict | None, *keys: str, blocked: bool = False) -> str:
    if row is None:
        return "not run"
    if "failure" in row:
        return "✗ " + row["failure"][:60].replace("|", "/")
    mark = "" if row.get("correct", True) else f" ✗ err {row.get('error', float('nan')):.0e}"
    if blocked and "blocked_call_s" in row:  # no separate compile: torchntk's blocked call, first / second
        return f"{row['conversion_s']:.1f} / blocked call {row['blocked_call_s']:.1f} / {row['warm_s']:.1f}" + mark
    values = [f"{row[k]:.1f}" if isinstance(row.get(k), float) else str(row.get(k, "")) for k in keys]
    return " / ".join(values) + mark


def table(data: dict) -> str:
    rows = []
    for name, e in sorted(data["models"].items(), key=lambda item: item[1].get("params", 0)):
        size = next((e[s]["size"] for s in STAGES if "size" in e.get(s, {})), "")
        rows.append(
            [
                name,
                f"{e.get('params', 0) / 1e6:.1f}",
                size,
                _cell(e.get("onnx-jax"), "conversion_s", "compile_s", "warm_s", blocked=True),
                f"{first_call(e.get('onnx-jax', {})):.0f}" if first_call(e.get("onnx-jax", {})) else "—",
                _cell(e.get("onnx-tf"), "conversion_s", "compile_s", "warm_s"),
                _cell(e.get("ref"), "first_s"),
                _cell(e.get("auto"), "first_s", "choice"),
            ]
        )
    header = [
        "model",
        "M params",
        "input",
        "onnx-jax convert / compile / warm s",
        "SD first call s",
        "onnx-tf convert / compile / warm s",
        "NVP first s",
        "auto first s / choice",
    ]
    counts = summary(data)
    slowest = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in counts["slowest_sd_first"])
    head = (
        f"{counts['builders']} builders; {counts['ran']} reached by the sweep; correct through structured derivatives: "
        f"{counts['sd_correct']}; correct through auto: {counts['auto_correct']} "
        f"({counts['auto_as_reference']} of them chose NTK-vector products, the reference's own method: agreement, "
        "not an independent check; that method "
        "is checked against the explicit-Jacobian oracle in the tests). Structured first call (onnx-jax "
        f"stage) ≤ {FIRST_CALL_TARGET_S:.0f} s: {counts['sd_first_within_target']} of {counts['sd_first_measured']} "
        f"measured; slowest: {slowest}.\n\n"
    )
    return head + markdown_table(header, rows)


README = HERE.parent / "README.md"
_BEGIN, _END = "<!-- zoo table: python benchmarks/zoo.py --readme -->", "<!-- end of zoo table -->"


def render_readme(data: dict) -> None:
    """Replace the README's zoo table (between the two markers) with the one rendered from the JSON."""
    text = README.read_text()
    start, end = text.index(_BEGIN) + len(_BEGIN), text.index(_END)
    README.write_text(text[:start] + "\n" + table(data) + "\n" + text[end:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+")
    parser.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument("--memory-gb", type=float, default=5.0)
    parser.add_argument("--ref-memory-gb", type=float, help="the reference stage's cap (default: --memory-gb)")
    parser.add_argument("--redo", action="store_true")
    parser.add_argument("--retry-failed", action="store_true", help="run again the stages recorded as failures")
    parser.add_argument("--pause-file", type=Path, help="no stage starts while this file exists")
    parser.add_argument("--redo-above-load", type=float, help="run again stages measured at a higher load average")
    parser.add_argument("--table", action="store_true", help="print the README table from results/zoo.json")
    parser.add_argument("--readme", action="store_true", help="render the table into README.md")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], args.child[1], Path(args.child[2]))
    elif args.table or args.readme:
        data = json.loads(OUT.read_text())
        print(table(data))
        if args.readme:
            render_readme(data)
    else:
        sweep(
            args.models or _models(),
            args.stages,
            args.timeout,
            args.memory_gb,
            args.redo,
            args.retry_failed,
            args.pause_file,
            args.redo_above_load,
            args.ref_memory_gb,
        )


if __name__ == "__main__":
    main()
