"""GPU benchmark of ``benchmarks/gpu_check.sh``: torchntk's three methods on a CUDA model, side by side.

Sections, in this order (each in its own child process, so that one section's out-of-memory or JAX memory pool
does not change the next one's; the whole run stops starting points once ``--deadline-s`` has passed):

* ``anchors`` — the FCN of ``benchmarks/anchors.py`` (3 hidden ReLU layers of width W, NTK parameterisation, no
  bias, input size W, N1 = N2 = 8, float32, ``trace_axes=()``) at W ∈ {1024, 4096}, O ∈ {10, 100};
* ``resnet18`` / ``resnet50`` — torchvision ResNets at 224×224, one pair (N1 = N2 = 1, x1 ≠ x2), O ∈ {1, 10, 1000}
  (paper Fig. 2); resnet18 with O = 1000 is the full 1000×1000 NTK of one pair;
* ``widths`` — the largest FCN width (O = 10, N = 8, doubling from 1024) each method computes within
  ``--width-call-s`` per call.

Per point: one cold call (structured derivatives: conversion to JAX and compilation included), then warm calls —
the median of ≥ 3 (one when a call takes over 10 s); time is wall-clock around ``torch.cuda.synchronize()``.
Memory: torch's peak allocated bytes over the warm calls (``torch.cuda.max_memory_allocated``), and for structured
derivatives JAX's peak bytes in use on the device (its process-wide peak, a child per section). Out-of-memory and
errors are recorded as the point's status. Results: one JSON under ``benchmarks/results/gpu/`` naming the device.

Usage::

    python benchmarks/gpu/bench_gpu.py --deadline-s 240
    python benchmarks/gpu/bench_gpu.py --sections anchors --widths 1024 --outputs 10   # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE.parent / "results" / "gpu"
METHODS = ("jacobian_contraction", "ntk_vector_products", "structured_derivatives")
SHORT = {"jacobian_contraction": "JC", "ntk_vector_products": "NVP", "structured_derivatives": "SD"}
SECTIONS = ("anchors", "resnet18", "resnet50", "widths")
PINNED = {"torch": "2.14.1", "jax": "0.10.2"}
SLOW_CALL_S = 10.0


# ------------------------------------------------------------------------------------------------ one point


def _fcn(device: str, width: int, outputs: int, n: int = 8) -> tuple[Any, Any, Any]:
    import torch

    sys.path.insert(0, str(HERE.parent))
    import _common as c

    with torch.device(device):  # weights drawn on the device: seconds saved at the largest widths
        model = c.ntk_mlp(width, width, 3, outputs)
    generator = torch.Generator().manual_seed(1)
    x1, x2 = (torch.randn(n, width, generator=generator).to(device) for _ in range(2))
    return model, x1, x2


def _resnet(device: str, name: str, outputs: int, resolution: int = 224) -> tuple[Any, Any, Any]:
    import torch
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, num_classes=outputs).eval().to(device)
    generator = torch.Generator().manual_seed(1)
    x1, x2 = (torch.randn(1, 3, resolution, resolution, generator=generator).to(device) for _ in range(2))
    return model, x1, x2


def _synchronize(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _is_oom(error: BaseException) -> bool:
    return isinstance(error, MemoryError) or "out of memory" in str(error).lower() or "RESOURCE_EXHAUSTED" in str(error)


def measure(model: Any, x1: Any, x2: Any, method: str, call_budget_s: float) -> dict[str, Any]:
    """One method on one case: cold call, warm median, peaks (see the module docstring)."""
    import gc

    import torch

    import torchntk
    from torchntk.bridge.device import jax_device_for

    device = x1.device

    kernels = []

    def call() -> float:
        _synchronize(device)
        start = time.perf_counter()
        kernel = torchntk.ntk(model, x1, x2, implementation=method, progress=False)
        _synchronize(device)
        assert kernel.device == device
        kernels[:] = [kernel]
        return time.perf_counter() - start

    point: dict[str, Any] = {"method": method, "method_short": SHORT[method]}
    try:
        point["cold_s"] = call()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        runs = [call()]
        while len(runs) < 3 and runs[0] < SLOW_CALL_S and sum(runs) < call_budget_s:
            runs.append(call())
        point.update(status="ok", median_s=statistics.median(runs), runs=len(runs))
        if device.type == "cuda":
            point["torch_peak_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
        if method == "structured_derivatives":
            point["jax_device"] = str(jax_device_for(device))
            stats = jax_device_for(device).memory_stats() or {}
            point["jax_peak_gb"] = stats.get("peak_bytes_in_use", 0) / 1e9
        if point["median_s"] > call_budget_s:
            point["status"] = "over_budget"
        point["kernel"] = kernels[0].detach().double().cpu()  # compared across methods by run_section, then dropped
    except Exception as error:  # the benchmark records the failure and goes on
        point.update(status="oom" if _is_oom(error) else "error", error=f"{type(error).__name__}: {str(error)[:400]}")
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return point


# ------------------------------------------------------------------------------------------- one section (child)


def run_section(section: str, args: argparse.Namespace, deadline: float) -> list[dict[str, Any]]:
    """The points of one section, in this process; points not started before ``deadline`` are marked so."""
    points: list[dict[str, Any]] = []
    failed: set[str] = set()  # methods that ran out of memory / time at a smaller case: larger ones are skipped

    def run(case: dict[str, Any], build: Any, call_budget_s: float) -> None:
        built = None
        first = None  # the first method's kernel: every other method's is compared with it
        for method in args.methods:
            point = {**case}
            if time.monotonic() > deadline:
                point.update(method=method, method_short=SHORT[method], status="skipped", error="deadline")
            elif method in failed:
                point.update(method=method, method_short=SHORT[method], status="skipped", error="smaller case failed")
            else:
                built = built or build()
                point.update(measure(*built, method, call_budget_s))
                if point["status"] != "ok":
                    failed.add(method)
                kernel = point.pop("kernel", None)
                if kernel is not None and first is None:
                    first = (SHORT[method], kernel)
                elif kernel is not None:  # relative to the largest entry; float32 on the GPU: ~1e-6, TF32: ~1e-3
                    gap = (kernel - first[1]).abs().max() / first[1].abs().max().clamp_min(1e-30)
                    point[f"rel_diff_vs_{first[0]}"] = float(gap)
            if point.get("median_s") is not None:
                point["per_pair_s"] = point["median_s"] / (case["N"] ** 2)
            print(json.dumps(point), flush=True)
            points.append(point)

    if section == "anchors":
        for width in args.widths:
            for outputs in args.outputs:
                case = {"section": section, "model": "fcn3", "W": width, "O": outputs, "N": 8}
                run(case, lambda w=width, o=outputs: _fcn(args.device, w, o), args.call_budget_s)
    elif section in ("resnet18", "resnet50"):
        for outputs in args.resnet_outputs:
            case = {"section": section, "model": section, "R": args.resolution, "O": outputs, "N": 1}
            budget = args.full_ntk_budget_s if outputs >= 1000 else args.call_budget_s
            run(case, lambda m=section, o=outputs: _resnet(args.device, m, o, args.resolution), budget)
    elif section == "widths":
        width = 1024
        while width <= args.max_width and len(failed) < len(args.methods):
            case = {"section": section, "model": "fcn3", "W": width, "O": 10, "N": 8}
            run(case, lambda w=width: _fcn(args.device, w, 10), args.width_call_s)
            width *= 2
    else:
        raise SystemExit(f"unknown section {section!r}; one of {SECTIONS}")
    return points


# --------------------------------------------------------------------------------------------- parent


def _command(args: list[str]) -> str:
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError) as error:
        return f"({args[0]} failed: {error})"


def environment() -> dict[str, Any]:
    """The device and the library versions the numbers were measured with."""
    import importlib.metadata

    import jax
    import torch

    import torchntk  # noqa: F401 - sets XLA's preallocation as users get it (recorded below)

    versions = {}
    for name in ("torch", "torchvision", "jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda13-pjrt", "numpy", "onnx"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    from torchntk.bridge.device import jax_bus_id, torch_bus_id

    try:  # what placement can match on: JAX's bus ids (when its plugin reports them) and CUDA ordinals
        jax_devices = [
            f"{d} ({d.device_kind}; ordinal {d.local_hardware_id}, bus id {jax_bus_id(d)}, "
            f"compute capability {getattr(d, 'compute_capability', None)})"
            for d in jax.devices("gpu")
        ]
    except RuntimeError as error:
        jax_devices = [f"no JAX GPU backend: {error}"]
    if torch.cuda.is_available():
        jax_devices.append(f"torch cuda:0 bus id {torch_bus_id(0)}")
    cuda = torch.cuda.is_available()
    props = torch.cuda.get_device_properties(0) if cuda else None
    return {
        "device_name": torch.cuda.get_device_name(0) if cuda else f"CPU {platform.processor() or platform.machine()}",
        "device_memory_gb": round(props.total_memory / 1e9, 1) if props else None,
        "compute_capability": f"{props.major}.{props.minor}" if props else None,
        "device_count": torch.cuda.device_count(),
        "jax_devices": jax_devices,
        "driver": _command(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]),
        "cpu": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "versions": versions,
        "pinned_versions_differ": {k: versions.get(k) for k, v in PINNED.items() if versions.get(k) != v},
        "torchntk_commit": _command(["git", "-C", str(HERE), "log", "-1", "--format=%h %cI"]),
        "xla_python_client_preallocate": os.environ.get("XLA_PYTHON_CLIENT_PREALLOCATE"),
        # what float32 products ran in: torchntk computes in float32 throughout unless the user asked torch for less
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "cudnn_allow_tf32_outside_calls": torch.backends.cudnn.allow_tf32,
    }


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--widths", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--outputs", type=int, nargs="+", default=[10, 100])
    parser.add_argument("--resnet-outputs", type=int, nargs="+", default=[1, 10, 1000])
    parser.add_argument("--max-width", type=int, default=32768)
    parser.add_argument("--resolution", type=int, default=224, help="of the ResNet inputs")
    parser.add_argument("--device", default="cuda", help="cpu: a smoke run of this script without a GPU")
    parser.add_argument("--call-budget-s", type=float, default=20.0, help="warm calls stop after this")
    parser.add_argument("--full-ntk-budget-s", type=float, default=90.0, help="for O = 1000")
    parser.add_argument("--width-call-s", type=float, default=10.0, help="the widths section's per-call limit")
    parser.add_argument("--deadline-s", type=float, default=240.0, help="no point starts after this (whole run)")
    parser.add_argument("--grace-s", type=float, default=120.0, help="a section's child is killed this long after")
    parser.add_argument("--out", type=Path, default=None, help="default: results/gpu/gpu_check_<device>.json")
    parser.add_argument("--section-child", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def write(out: Path, args: argparse.Namespace, env: dict, sections: dict, points: list, wall_s: float) -> None:
    """The results JSON, written atomically."""
    payload = {
        "benchmark": "gpu_check",
        "description": __doc__,
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "environment": env,
        "sections": sections,
        "wall_s": wall_s,
        "points": points,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    tmp.replace(out)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    start = time.monotonic()
    if args.section_child:  # child: one section, JSON lines on stdout
        run_section(args.section_child, args, start + args.deadline_s)
        return 0
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("bench_gpu.py needs a CUDA device (torch.cuda.is_available() is False); --device cpu smokes.")
    env = environment()
    out = args.out or RESULTS / f"gpu_check_{slug(env['device_name'])}.json"
    points: list[dict[str, Any]] = []
    sections: dict[str, Any] = {}
    for section in args.sections:
        left = args.deadline_s - (time.monotonic() - start)
        if left <= 0:
            sections[section] = {"status": "skipped: deadline"}
            continue
        child = [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:])]
        child += ["--section-child", section, "--deadline-s", str(left)]
        try:  # a point started before the deadline may run past it: by --grace-s at most
            done = subprocess.run(child, capture_output=True, text=True, timeout=left + args.grace_s)
            lines, status = done.stdout, f"exit {done.returncode}"
            tail = done.stderr[-1500:] if done.returncode else ""
        except subprocess.TimeoutExpired as expired:
            partial = expired.stdout or b""
            lines, status, tail = partial.decode() if isinstance(partial, bytes) else partial, "timeout", ""
        found = [json.loads(line) for line in lines.splitlines() if line.startswith("{")]
        points += found
        sections[section] = {"status": status, "points": len(found), "stderr_tail": tail}
        print(f"{section}: {status}, {len(found)} points", flush=True)
        write(out, args, env, sections, points, time.monotonic() - start)  # after each section: a kill keeps them
    write(out, args, env, sections, points, time.monotonic() - start)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
