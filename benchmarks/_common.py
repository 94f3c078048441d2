"""Shared benchmark helpers: timing, peak memory in a subprocess, budgets, JSON, tables and log-log plots.

Measurement protocol (used by ``fcn.py``, ``resnet.py``, ``anchors.py``):

* **Memory** — every (method, case) first runs in its own child process (``multiprocessing`` forkserver with torch,
  JAX and torchntk preloaded, so a child starts in well under a second). The child calls the method once (cold: for
  structured derivatives this converts the model and compiles), resets the kernel's peak-RSS counter
  (``/proc/self/clear_refs``), calls it again and reports the peak resident set size of that warm call, the RSS just
  before it (the baseline: interpreter, libraries, model, inputs, caches) and both call times. The parent polls the
  child's RSS and kills it above the memory limit: such a point is ``oom`` and is left out of the plots, like the
  paper's missing points. A warm call slower than the time budget is ``over_budget``; larger widths of that method
  are then skipped, and so are cases whose time or memory, extrapolated from the previous width (∝ W²), exceed the
  budget or the limit.
* **Time** — all methods that passed the probe are then timed side by side in the parent process: one warm-up call
  each, then round-robin calls (so load changes hit every method alike) until each has ≥ 5 runs and ≥ 0.5 s; the
  median is reported. Conversion and compilation happen in the warm-up and are reported separately (from the probe).

The child-side helpers (peak RSS via ``/proc``) use only the standard library, so the neural-tangents child, which
runs in its own virtual environment, can import this module too.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
GB = 1e9
MIN_REPEATS = 5
MIN_TOTAL_S = 0.5
MAX_REPEATS = 50

# ----------------------------------------------------------------------------------------------- machine and load


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def wait_for_load(threshold: float, max_wait_s: float, poll_s: float = 60.0) -> list[float]:
    """Sleep until the 1-minute load average is below ``threshold`` (at most ``max_wait_s``); return the load."""
    deadline = time.monotonic() + max_wait_s
    while os.getloadavg()[0] >= threshold and time.monotonic() < deadline:
        print(f"load average {load_average()} >= {threshold}: waiting {poll_s:.0f} s", flush=True)
        time.sleep(poll_s)
    return load_average()


def _command(args: list[str]) -> str:
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError) as error:
        return f"({' '.join(args)} failed: {error})"


def machine() -> dict[str, Any]:
    """What the numbers were measured on: CPU model, cores, memory, library versions, load average."""
    info: dict[str, Any] = {"platform": platform.platform(), "python": platform.python_version()}
    lscpu = _command(["lscpu"])
    for key in ("Model name", "CPU(s)", "Thread(s) per core", "L3 cache", "Flags"):
        match = re.search(rf"^{re.escape(key)}:\s*(.*)$", lscpu, re.M)
        if match and key != "Flags":
            info[key] = match.group(1).strip()
        elif match:
            info["avx512"] = "avx512f" in match.group(1)
    info["memory_total_gb"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GB, 1)
    for name in ("torch", "jax", "jaxlib", "numpy"):
        try:
            info[name] = __import__(name).__version__
        except ImportError:
            pass
    commit = _command(["git", "-C", str(HERE), "log", "-1", "--format=%h %cI"])
    dirty = _command(["git", "-C", str(HERE), "status", "--porcelain", "--untracked-files=no", "../torchntk"])
    info["torchntk_commit"] = commit + (" (torchntk/ modified)" if dirty else "")
    info["load_average"] = load_average()
    return info


def write_machine_md(path: Path = RESULTS / "machine.md") -> None:
    """``lscpu`` and ``free -g`` verbatim, for ``results/machine.md``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = (
        "# Machine the benchmark results were measured on\n\n"
        f"Written by `benchmarks/_common.py` on {time.strftime('%Y-%m-%d %H:%M %Z')}; load average at writing: "
        f"{load_average()} (each result JSON records the load average before and after its own run).\n\n"
        f"## lscpu\n\n```\n{_command(['lscpu'])}\n```\n\n## free -g\n\n```\n{_command(['free', '-g'])}\n```\n"
    )
    path.write_text(text)


# --------------------------------------------------------------------------------------- peak RSS (stdlib only)


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as file:
        match = re.search(rf"^{field}:\s+(\d+) kB", file.read(), re.M)
    return int(match.group(1)) if match else 0


def rss_bytes() -> int:
    return 1024 * _status_kb("VmRSS")


def peak_rss_bytes() -> int:
    """Peak resident set size of this process since it started or since :func:`reset_peak_rss`."""
    return 1024 * _status_kb("VmHWM")


def reset_peak_rss() -> None:
    """Reset VmHWM to the current RSS (Linux ≥ 4.0: writing 5 to clear_refs)."""
    with open("/proc/self/clear_refs", "w") as file:
        file.write("5")


def measure_calls(
    prepare: Callable[[], float | None], call: Callable[[], Any], budget_s: float, warm: bool = True
) -> dict[str, Any]:
    """In a child: ``prepare()`` (conversion, returns seconds or None), a cold call, then a warm call's peak RSS.

    ``warm=False`` stops after the cold call (its time and the process peak are reported; for one-off huge cases).
    """
    result: dict[str, Any] = {"rss_start_bytes": rss_bytes()}
    result["conversion_s"] = prepare()
    result["baseline_bytes"] = rss_bytes()
    start = time.perf_counter()
    call()
    result["first_call_s"] = time.perf_counter() - start
    result["first_peak_bytes"] = peak_rss_bytes()
    if not warm:
        peak = result["first_peak_bytes"]
        return {**result, "status": "ok", "peak_bytes": peak, "increment_bytes": peak - result["baseline_bytes"]}
    if result["first_call_s"] > 3 * budget_s:
        return {**result, "status": "over_budget", "peak_bytes": result["first_peak_bytes"]}
    reset_peak_rss()
    result["baseline_bytes"] = rss_bytes()
    start = time.perf_counter()
    call()
    result["warm_call_s"] = time.perf_counter() - start
    result["peak_bytes"] = peak_rss_bytes()
    result["increment_bytes"] = result["peak_bytes"] - result["baseline_bytes"]
    result["status"] = "over_budget" if result["warm_call_s"] > budget_s else "ok"
    return result


# ------------------------------------------------------------------------------------------ child processes


_CONTEXT: Any = None
PRELOAD = ["torch", "jax", "torchntk", "_common"]


def preload_converter(needed: bool) -> None:
    """Also preload the onnx-tf route (TensorFlow: seconds to import) in the forkserver, for structured derivatives,
    so that a child's conversion time is the conversion's own. Call before the first :func:`probe`."""
    if needed and "torchntk.converters.onnx_tf" not in PRELOAD:
        PRELOAD.append("torchntk.converters.onnx_tf")


def _context() -> Any:
    """A forkserver whose server process has imported torch, JAX and torchntk once (children fork from it)."""
    global _CONTEXT
    if _CONTEXT is None:
        # One fresh conversion cache per benchmark run, shared by the children and this process: the first child of
        # each architecture converts cold (its conversion_s is the cold export + route); later ones reuse the export.
        os.environ["TORCHNTK_CACHE_DIR"] = tempfile.mkdtemp(prefix="torchntk-bench-cache-")
        _CONTEXT = multiprocessing.get_context("forkserver")
        _CONTEXT.set_forkserver_preload(PRELOAD)
    return _CONTEXT


def _child(queue: Any, target: Callable[..., dict], spec: dict, budget_s: float) -> None:
    try:
        queue.put(target(spec, budget_s))
    except Exception as error:  # reported as this point's status; the benchmark goes on
        queue.put({"status": "error", "error": f"{type(error).__name__}: {str(error)[:600]}"})


def probe(target: Callable[..., dict], spec: dict, *, memory_limit: float, timeout_s: float, budget_s: float) -> dict:
    """Run ``target(spec, budget_s) -> dict`` (built on :func:`measure_calls`) in a child; enforce the limits."""
    import psutil

    ctx = _context()
    queue = ctx.Queue()
    process = ctx.Process(target=_child, args=(queue, target, spec, budget_s))
    start = time.monotonic()
    process.start()
    watched = psutil.Process(process.pid)
    max_rss, status = 0, None
    while process.is_alive():
        try:
            max_rss = max(max_rss, watched.memory_info().rss)
        except psutil.NoSuchProcess:
            break
        if max_rss > memory_limit:
            status = "oom"
        elif time.monotonic() - start > timeout_s:
            status = "timeout"
        if status:
            process.kill()
            break
        time.sleep(0.02)
    result: dict = {}
    if status is None:
        try:
            result = queue.get(timeout=5)
        except Exception:  # the child died without a result (e.g. killed by the kernel's OOM killer)
            result = {}
    process.join(timeout=10)
    if process.is_alive():
        process.kill()
    if status or not result:
        result = {"status": status or "error", "error": result.get("error") or f"child exit code {process.exitcode}"}
        if status == "oom":
            result["error"] = f"RSS passed the {memory_limit / GB:.1f} GB limit"
    result["watched_max_rss_bytes"] = max_rss
    result["probe_wall_s"] = time.monotonic() - start
    return result


def memory_limit_bytes(requested_gb: float, reserve_gb: float = 1.5) -> float:
    """The memory limit: ``requested_gb``, or less if the machine has less available now (shared machine)."""
    import psutil

    return min(requested_gb * GB, psutil.virtual_memory().available - reserve_gb * GB)


# ------------------------------------------------------------------------------------------------ timing


def timed_side_by_side(calls: dict[str, Callable[[], Any]], single_s: dict[str, float]) -> dict[str, dict]:
    """Warm up each call once, then round-robin until each has ≥ 5 runs and ≥ 0.5 s; medians in seconds.

    ``single_s`` (one call's time, from the probe) sets how many runs each method needs.
    """
    warmup = {}
    for name, call in calls.items():
        start = time.perf_counter()
        call()
        warmup[name] = time.perf_counter() - start
    needed = {
        name: max(MIN_REPEATS, min(MAX_REPEATS, math.ceil(MIN_TOTAL_S / max(single_s.get(name, 1.0), 1e-4))))
        for name in calls
    }
    times: dict[str, list[float]] = {name: [] for name in calls}
    while any(len(times[name]) < needed[name] for name in calls):
        for name, call in calls.items():
            if len(times[name]) < needed[name]:
                start = time.perf_counter()
                call()
                times[name].append(time.perf_counter() - start)
    return {
        name: {
            "median_s": statistics.median(t),
            "min_s": min(t),
            "runs": len(t),
            "warmup_s": warmup[name],
            "spread": (max(t) - min(t)) / statistics.median(t),
        }
        for name, t in times.items()
    }


# ----------------------------------------------------------------------------------------- grid with budgets


class Budget:
    """Skips (method, series) points after an out-of-memory / over-budget one, or when the W² extrapolation of the
    previous point's time or memory passes the budget; records the reason."""

    def __init__(self, budget_s: float, memory_limit: float) -> None:
        self.budget_s, self.memory_limit = budget_s, memory_limit
        self.last: dict[tuple, tuple[float, dict]] = {}

    def skip_reason(self, key: tuple, size: float, exponent: float = 2.0) -> str | None:
        if key not in self.last:
            return None
        size0, previous = self.last[key]
        if previous["status"] != "ok":
            return f"skipped: {previous['status']} at a smaller size"
        growth = (size / size0) ** exponent
        if previous.get("warm_call_s", 0) * growth > self.budget_s:
            return f"skipped: predicted {previous['warm_call_s'] * growth:.0f} s > {self.budget_s:.0f} s budget"
        increment = previous.get("increment_bytes", 0) * growth
        if previous.get("baseline_bytes", 0) + increment > self.memory_limit:
            return f"skipped: predicted {(previous['baseline_bytes'] + increment) / GB:.1f} GB > limit"
        return None

    def record(self, key: tuple, size: float, result: dict) -> None:
        self.last[key] = (size, result)


# --------------------------------------------------------------------------------------------- output


def add_run_options(parser: Any, *, budget_help: str, out: Path | None) -> None:
    """The options every :func:`run_benchmark` script shares: time budget, memory limit, load wait, smoke, output."""
    parser.add_argument("--budget-s", type=float, default=10.0, help=budget_help)
    parser.add_argument("--memory-gb", type=float, default=20.0, help="memory limit per child (less if not free)")
    parser.add_argument("--wait-load", type=float, default=None, help="first wait until the 1-min load is below")
    parser.add_argument("--max-wait-min", type=float, default=40.0)
    parser.add_argument("--smoke", action="store_true", help="the smallest case only (tests)")
    parser.add_argument("--out", type=Path, default=out)


def run_benchmark(
    name: str,
    doc: str,
    args: Any,
    run: Callable[[Any], dict],
    table: Callable[[list[dict]], str],
    *,
    converter_needed: bool,
) -> dict:
    """Wait for a quiet machine if asked, run ``run(args)``, and write and print the results with their conditions."""
    load_before = wait_for_load(args.wait_load, 60 * args.max_wait_min) if args.wait_load else load_average()
    preload_converter(converter_needed)
    start = time.time()
    result = run(args)
    markdown = table(result["points"])
    payload = {
        "benchmark": name,
        "description": doc.split("\n\n")[1],
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "machine": machine(),
        "load_average_before": load_before,
        "load_average_after": load_average(),
        "wall_s": time.time() - start,
        "table_markdown": markdown,
        **result,
    }
    write_json(args.out, payload)
    print(markdown)
    print(f"load average before {load_before}, after {payload['load_average_after']}; {payload['wall_s']:.0f} s")
    return payload


def write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1, default=str) + "\n")
    print(f"wrote {path}")


def fmt_ms(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    ms = 1e3 * seconds
    return f"{ms:,.0f}" if ms >= 100 else f"{ms:.3g}"


def fmt_gb(value: float | None) -> str:
    return "—" if value is None else f"{value / GB:.2f}"


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def point_label(point: dict) -> str:
    """A table cell: the median time in ms, or why the point is missing."""
    if point.get("median_s") is not None:
        return fmt_ms(point["median_s"])
    status = point.get("status", "?")
    predicted = re.match(r"skipped: predicted ([\d.]+) (s|GB)", status)
    if predicted:
        return f"{'> budget' if predicted.group(2) == 's' else 'OOM'} (pred. {predicted.group(1)} {predicted.group(2)})"
    for word, short in (("over_budget", "> budget"), ("oom", "OOM"), ("timeout", "timeout")):
        if status.startswith((word, f"skipped: {word}")):
            return short
    return status.split(":")[0]


def loglog_panels(
    points: list[dict],
    *,
    x: str,
    y: str,
    panel: str,
    row: str,
    series: str,
    path: Path,
    title: str,
    xlabel: str,
    ylabel: str,
    styles: dict[str, dict] | None = None,
) -> None:
    """Paper-style figure: one panel per (``row`` value, ``panel`` value), log-log lines per ``series``.

    Points without a ``y`` value (OOM, over budget, skipped) are simply absent, as in the paper's figures.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted({p[row] for p in points})
    panels = sorted({p[panel] for p in points})
    fig, axes = plt.subplots(
        len(rows), len(panels), figsize=(3.4 * len(panels), 2.8 * len(rows)), squeeze=False, sharex=True
    )
    names = list(dict.fromkeys(p[series] for p in points))
    for i, r in enumerate(rows):
        for j, c in enumerate(panels):
            ax = axes[i][j]
            for name in names:
                got = sorted(
                    (p[x], p[y])
                    for p in points
                    if p[row] == r and p[panel] == c and p[series] == name and p.get(y) is not None
                )
                if got:
                    ax.plot(*zip(*got, strict=True), marker="o", ms=3, label=name, **(styles or {}).get(name, {}))
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"{panel}={c}, {row}={r}", fontsize=9)
            ax.grid(True, which="major", alpha=0.3)
            if i == len(rows) - 1:
                ax.set_xlabel(xlabel)
            if j == 0:
                ax.set_ylabel(ylabel)
    handles, labels = {}, {}
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(lab, h)
            labels.setdefault(lab, lab)
    fig.legend(handles.values(), labels.values(), loc="lower center", ncol=min(len(handles), 6), fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.06, 1, 0.96))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")


# ------------------------------------------------------------------------------------- models and methods (torch)

TORCHNTK_METHODS = ("jacobian_contraction", "ntk_vector_products", "structured_derivatives", "auto")
SHORT = {
    "jacobian_contraction": "JC",
    "ntk_vector_products": "NVP",
    "structured_derivatives": "SD",
    "auto": "auto",
}


def ntk_mlp(in_dim: int, width: int, depth: int, outputs: int, seed: int = 0) -> Any:
    """nt.stax's FCN in torch: ``depth`` hidden ReLU layers of ``width``, no bias, NTK parameterisation
    (``y = W x / sqrt(fan_in)``, ``W ~ N(0, 1)``: weight variance 1), a linear readout of ``outputs``."""
    import torch

    class NTKLinear(torch.nn.Module):
        def __init__(self, fan_in: int, fan_out: int) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(fan_out, fan_in))
            self.scale = fan_in**-0.5

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.linear(x, self.weight) * self.scale

    torch.manual_seed(seed)
    layers, fan_in = [], in_dim
    for _ in range(depth):
        layers += [NTKLinear(fan_in, width), torch.nn.ReLU()]
        fan_in = width
    layers.append(NTKLinear(fan_in, outputs))
    return torch.nn.Sequential(*layers).eval()


def torchntk_case(model: Any, x1: Any, x2: Any, method: str, max_memory: float) -> tuple[Callable, Callable]:
    """``(prepare, call)`` for one torchntk method: ``prepare()`` converts the model for structured derivatives (and
    runs ``explain`` for auto) and returns its seconds; ``call()`` computes the kernel."""
    import torchntk

    def prepare() -> float | None:
        start = time.perf_counter()
        if method == "structured_derivatives":
            from torchntk.converters import to_jax

            to_jax(model, (x1,), params=[name for name, p in model.named_parameters() if p.requires_grad])
        elif method == "auto":
            torchntk.explain(model, x1, x2, max_memory=int(max_memory))
        else:
            return None
        return time.perf_counter() - start

    def call() -> Any:
        return torchntk.ntk(model, x1, x2, implementation=method, max_memory=int(max_memory), progress=False)

    return prepare, call


def forget_compiled() -> None:
    """Drop torchntk's compiled structured NTK functions and JAX's caches between cases (parent memory)."""
    import jax

    from torchntk.bridge import torch_glue

    torch_glue._COMPILED.clear()
    jax.clear_caches()


def model_mode_parser(doc: str, models: Sequence[str], modes: Sequence[str], out: Path) -> argparse.ArgumentParser:
    """The command line of a script that runs each (model, mode) in a child process: ``--models``, ``--modes``,
    ``--timeout``, ``--out`` and the hidden ``--child MODEL MODE``."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(models))
    parser.add_argument("--modes", nargs="+", default=list(modes), choices=modes)
    parser.add_argument("--timeout", type=float, default=900.0)
    parser.add_argument("--out", type=Path, default=out)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    return parser


def compiled_run_seconds(compiled: Callable, args: Sequence[Any], warm: int = 3) -> tuple[Any, float, float]:
    """``compiled(*args)``'s result, its first run's seconds and the median of ``warm`` more (JAX: each awaited)."""
    import jax

    start = time.perf_counter()
    result = jax.block_until_ready(compiled(*args))
    first, times = time.perf_counter() - start, []
    for _ in range(warm):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - start)
    return result, first, statistics.median(times)


def model_mode_child(
    script: str, name: str, mode: str, timeout: float, marker: str, env: dict[str, str] | None = None
) -> dict:
    """``script --child name mode`` in a fresh process: its row is its output line starting with ``marker`` (JSON),
    with the process's seconds (``process_s``); a timeout, or a child without that line, is a failure row naming
    why (its last line of stderr)."""
    start = time.perf_counter()
    try:
        done = subprocess.run(
            [sys.executable, script, "--child", name, mode], capture_output=True, text=True, timeout=timeout, env=env
        )
    except subprocess.TimeoutExpired:
        return {"model": name, "mode": mode, "failure": f"timeout ({timeout:.0f} s)"}
    for line in done.stdout.splitlines():
        if line.startswith(marker):
            return json.loads(line.removeprefix(marker)) | {"process_s": time.perf_counter() - start}
    tail = done.stderr.strip().splitlines()[-1][:300] if done.stderr.strip() else "no result"
    return {"model": name, "mode": mode, "failure": tail}
