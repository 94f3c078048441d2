"""Anchors: torchntk against what a PyTorch user has today and against neural-tangents 0.6.5, same FCN, same session.

Model (the issue-4 target, as in ``bench_fcn_structured.py``): 3 hidden ReLU layers of width W, no bias, weight
variance 1 in the NTK parameterisation, input size W, readout O; N1 = N2 = 8 random inputs (``--x2-none``: x2 =
None, the symmetric kernel of one batch, in every row), float32,
``trace_axes=()`` (the full ``Tensor[8, 8, O, O]``). Rows:

* ``tutorial JC`` / ``tutorial NVP`` — the PyTorch torch.func NTK tutorial's two methods, rewritten from its
  description: Jacobian contraction (``vmap(jacrev)`` per input batch, one ``einsum('Naf,Mbf->NMab')`` per
  parameter, summed) and NTK-vector products (``vmap`` over all pairs of examples of ``vmap`` over the O basis
  vectors of a VJP through ``x1`` followed by a JVP through ``x2``);
* ``torchntk JC / NVP / SD`` — ``torchntk.ntk(model, x1, x2, implementation=...)`` on the torch model (SD converts
  the model to JAX once; the conversion is reported separately), and ``torchntk SD (JAX)`` — the same structured
  derivatives interpreter on the pure-JAX FCN of ``bench_fcn_structured.py`` (no torch glue, no conversion);
* ``neural-tangents JC / NVP / SD`` — ``nt.empirical_ntk_fn(..., implementation=1, 2, 3)`` with ``nt.stax`` on jax
  0.4.25, each in a child process of /work/nt-venv (skipped with a message when that venv is missing).

Time: median of ≥ 5 runs after a warm-up (torch rows side by side in this process; each neural-tangents row in
its own process right after, in the same session); memory: the peak RSS of one warm call in a child process, with
the process baseline. A method whose single call exceeds ``--budget-s`` shows that one call's time instead of a
median (marked ``1 run``); one predicted (∝ W²) or measured beyond the memory limit is OOM. ``--widths-max`` also
extrapolates, from each method's measured memory at the anchor widths, the largest width below 20 GB.

Usage::

    python benchmarks/anchors.py            # W 512/1024, O 10/100 (~10 min on 2 cores)
    python benchmarks/anchors.py --quick    # W 128/256, O 10
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import _common as c

NT_PYTHON = Path("/work/nt-venv/bin/python")
TORCH_ROWS = ("tutorial JC", "tutorial NVP", "torchntk JC", "torchntk NVP", "torchntk SD", "torchntk SD (JAX)")
#: The structured program a repeated call reaches: the default row's few calls run the fast compile tier's program
#: (``torchntk.bridge.compile_tiers``) until its runs have paid for the optimised compile. Not in the same run as
#: "torchntk SD": once the optimised program exists, every call of its shapes uses it.
OPTIMISED_ROW = "torchntk SD (optimised tier)"
NT_ROWS = {"neural-tangents JC": 1, "neural-tangents NVP": 2, "neural-tangents SD": 3}
TORCHNTK = {
    "torchntk JC": "jacobian_contraction",
    "torchntk NVP": "ntk_vector_products",
    "torchntk SD": "structured_derivatives",
}
DEPTH = 3


def tutorial_jacobian_contraction(fnet_single, params, x1, x2):
    """The tutorial's ``empirical_ntk_jacobian_contraction``: ``Tensor[N1, N2, O, O]``."""
    import torch
    from torch.func import jacrev, vmap

    jac1 = [j.flatten(2) for j in vmap(jacrev(fnet_single), (None, 0))(params, x1).values()]
    jac2 = [j.flatten(2) for j in vmap(jacrev(fnet_single), (None, 0))(params, x2).values()]
    return torch.stack([torch.einsum("Naf,Mbf->NMab", j1, j2) for j1, j2 in zip(jac1, jac2, strict=True)]).sum(0)


def tutorial_ntk_vps(fnet_single, params, x1, x2):
    """The tutorial's ``empirical_ntk_ntk_vps`` (compute='full'): ``Tensor[N1, N2, O, O]``."""
    import torch
    from torch.func import jvp, vjp, vmap

    def get_ntk(x1, x2):
        output, vjp_fn = vjp(lambda p: fnet_single(p, x1), params)

        def get_ntk_slice(vec):
            (vjps,) = vjp_fn(vec)
            return jvp(lambda p: fnet_single(p, x2), (params,), (vjps,))[1]

        basis = torch.eye(output.numel(), dtype=output.dtype).view(output.numel(), -1)
        return vmap(get_ntk_slice)(basis)

    return vmap(vmap(get_ntk, (None, 0)), (0, None))(x1, x2)


def build(spec: dict):
    import torch

    model = c.ntk_mlp(spec["W"], spec["W"], DEPTH, spec["O"])
    generator = torch.Generator().manual_seed(1)
    x1 = torch.randn(spec["N"], spec["W"], generator=generator)
    x2 = torch.randn(spec["N"], spec["W"], generator=generator)
    return model, x1, None if spec.get("x2_none") else x2


def torch_row(spec: dict, row: str):
    """``(prepare, call)`` for one torch-side row of the table."""
    import torch

    model, x1, x2 = build(spec)
    if row in TORCHNTK:
        return c.torchntk_case(model, x1, x2, TORCHNTK[row], spec["max_memory"])
    if row == OPTIMISED_ROW:
        prepare, call = c.torchntk_case(model, x1, x2, "structured_derivatives", spec["max_memory"])
        return prepare, optimised_tier(call)
    if row == "torchntk SD (JAX)":
        return jax_bridge_row(model, x1, x2)
    params = {k: v.detach() for k, v in model.named_parameters()}
    x2 = x1 if x2 is None else x2  # the tutorial's methods take both sides

    def fnet_single(p, x):
        return torch.func.functional_call(model, p, (x.unsqueeze(0),)).squeeze(0)

    method = tutorial_jacobian_contraction if row == "tutorial JC" else tutorial_ntk_vps
    return (lambda: None), (lambda: method(fnet_single, params, x1, x2))


def optimised_tier(call):
    """``call`` with ``TORCHNTK_FAST_COMPILE=0``: its programs compile in the optimised tier at once."""

    def run():
        before = os.environ.get("TORCHNTK_FAST_COMPILE")
        os.environ["TORCHNTK_FAST_COMPILE"] = "0"
        try:
            return call()
        finally:
            if before is None:
                os.environ.pop("TORCHNTK_FAST_COMPILE")
            else:
                os.environ["TORCHNTK_FAST_COMPILE"] = before

    return run


def jax_bridge_row(model, x1, x2):
    """``structured_ntk_fn`` on ``bench_fcn_structured.fcn`` with the torch model's weights (NTK scaling alike)."""
    import jax
    import jax.numpy as jnp
    from bench_fcn_structured import fcn

    from torchntk.bridge import structured_ntk_fn

    params = [jnp.asarray(m.weight.detach().numpy().T) for m in model if hasattr(m, "weight")]
    j1, j2 = jnp.asarray(x1.numpy()), None if x2 is None else jnp.asarray(x2.numpy())
    fn = jax.jit(structured_ntk_fn(fcn, trace_axes=()))
    return (lambda: None), (lambda: fn(j1, j2, params).block_until_ready())


def probe_target(spec: dict, budget_s: float) -> dict:
    prepare, call = torch_row(spec, spec["row"])
    return c.measure_calls(prepare, call, budget_s)


def run_neural_tangents(spec: dict, row: str, args: argparse.Namespace, limit: float) -> dict:
    if not NT_PYTHON.exists():
        return {"status": "skipped: /work/nt-venv missing (pip install neural-tangents==0.6.5 jax==0.4.25 ...)"}
    payload = {**spec, "depth": DEPTH, "in_dim": spec["W"], "implementation": NT_ROWS[row], "budget_s": args.budget_s}
    payload.pop("max_memory", None)
    command = [str(NT_PYTHON), str(c.HERE / "_nt_child.py"), json.dumps(payload)]
    import psutil

    start = time.monotonic()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=c.HERE)
    watched, max_rss, status = psutil.Process(process.pid), 0, None
    while process.poll() is None:
        try:
            max_rss = max(max_rss, watched.memory_info().rss)
        except psutil.NoSuchProcess:
            break
        if max_rss > limit or time.monotonic() - start > 6 * args.budget_s + 120:
            status = "oom" if max_rss > limit else "timeout"
            process.kill()
        time.sleep(0.02)
    out, err = process.communicate()
    if status:
        return {"status": status, "watched_max_rss_bytes": max_rss}
    lines = [line for line in out.splitlines() if line.startswith("{")]
    if process.returncode or not lines:
        return {"status": "error", "error": err.strip().splitlines()[-1][:600] if err.strip() else "no output"}
    return {**json.loads(lines[-1]), "watched_max_rss_bytes": max_rss}


def run(args: argparse.Namespace) -> dict:
    limit = c.memory_limit_bytes(args.memory_gb)
    budget = c.Budget(args.budget_s, limit)
    points = []
    for o in args.outputs:
        for width in sorted(args.widths):
            spec = {"W": width, "O": o, "N": args.n, "max_memory": limit, "x2_none": args.x2_none}
            results = {}
            for row in args.rows:
                reason = budget.skip_reason((o, row), width)
                if reason:
                    results[row] = {"status": reason}
                elif row in NT_ROWS:
                    results[row] = run_neural_tangents(spec, row, args, limit)
                else:
                    results[row] = c.probe(
                        probe_target,
                        {**spec, "row": row},
                        memory_limit=limit,
                        timeout_s=6 * args.budget_s + 120,
                        budget_s=args.budget_s,
                    )
                if not reason:
                    budget.record((o, row), width, results[row])
            ok = [r for r in args.rows if r not in NT_ROWS and results[r]["status"] == "ok"]
            calls = {r: torch_row(spec, r)[1] for r in ok}
            timings = c.timed_side_by_side(calls, {r: results[r]["warm_call_s"] for r in ok}) if ok else {}
            c.forget_compiled()
            for row in args.rows:
                point = {"W": width, "O": o, "N": args.n, "depth": DEPTH, "row": row, **results[row]}
                point.update(timings.get(row, {}))
                if "median_s" not in point and point["status"] == "over_budget" and point.get("warm_call_s"):
                    point["single_run_s"] = point["warm_call_s"]
                points.append(point)
            print(
                f"W={width} O={o}: "
                + "  ".join(f"{r}: {label(p)}" for r, p in zip(args.rows, points[-len(args.rows) :], strict=True)),
                flush=True,
            )
    return {"points": points, "memory_limit_bytes": limit}


def label(point: dict) -> str:
    if point.get("single_run_s"):
        return f"{c.fmt_ms(point['single_run_s'])} (1 run)"
    return c.point_label(point)


def largest_width(points: list[dict], row: str, o: int, limit_gb: float = 20.0) -> str:
    """Largest power-of-two W whose peak RSS stays below ``limit_gb``, extrapolated (not run).

    Every method's memory here is ``a + b·W²`` at fixed N and O (parameters, Jacobians, per-layer products), so the
    peaks (which include the parameters and the process baseline) at the two largest measured widths give a and b;
    with one width, ``b·W²`` is the warm call's increment over the baseline.
    """
    measured = sorted(
        (p["W"], p["peak_bytes"], p) for p in points if p["row"] == row and p["O"] == o and p.get("peak_bytes")
    )
    if not measured:
        return "—"
    if len(measured) >= 2 and measured[-1][1] > measured[-2][1]:
        (w0, m0, _), (w1, m1, _) = measured[-2], measured[-1]
        b = (m1 - m0) / (w1**2 - w0**2)
        a = m0 - b * w0**2
    else:
        w1, peak, p = measured[-1]
        baseline = p.get("baseline_bytes", 0)  # neural-tangents' child reports its peak only
        b, a = max(p.get("increment_bytes", peak - baseline), 1) / w1**2, baseline
    w_max = math.sqrt(max(limit_gb * c.GB - a, 0) / b)
    return f"{2 ** int(math.floor(math.log2(w_max)))} (~{int(w_max):,})" if w_max >= 1 else "—"


def table(points: list[dict], widths: list[int], outputs: list[int], rows: list[str]) -> str:
    """Markdown: one row per method, ``ms (× torchntk SD)`` per case, the last case's peak RSS, the largest width."""
    cases = [(w, o) for o in outputs for w in sorted(widths)]
    index = {(p["W"], p["O"], p["row"]): p for p in points}
    header = ["method"] + [f"W={w}, O={o}: ms (× torchntk SD)" for w, o in cases]
    header += [f"peak GB (W={cases[-1][0]}, O={cases[-1][1]})"] + [f"largest W < 20 GB, O={o}" for o in outputs]
    out = []
    for row in rows:
        cells = []
        for w, o in cases:
            mine, ref = index[(w, o, row)], index.get((w, o, "torchntk SD"), {})
            t = mine.get("median_s") or mine.get("single_run_s")
            r = t / ref["median_s"] if t and ref.get("median_s") and row != "torchntk SD" else None
            ratio = "" if r is None else f" (×{r:,.0f})" if r >= 10 else f" (×{r:.2f})"
            cells.append(label(mine) + ratio)
        last = index[(*cases[-1], row)]
        peak = c.fmt_gb(last.get("peak_bytes")) if last["status"] in ("ok", "over_budget") else label(last)
        out.append([row, *cells, peak, *(largest_width(points, row, o) for o in outputs)])
    return c.markdown_table(header, out)


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[512, 1024])
    parser.add_argument("--outputs", type=int, nargs="+", default=[10, 100])
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument(
        "--rows", nargs="+", default=[*TORCH_ROWS, *NT_ROWS], choices=[*TORCH_ROWS, OPTIMISED_ROW, *NT_ROWS]
    )
    c.add_run_options(parser, budget_help="one call above this: a single run is shown", out=c.RESULTS / "anchors.json")
    parser.add_argument("--quick", action="store_true", help="W 128/256, O 10")
    parser.add_argument("--x2-none", action="store_true", help="x2=None (the symmetric kernel of x1) in every row")
    args = parser.parse_args(argv)
    if OPTIMISED_ROW in args.rows and "torchntk SD" in args.rows:
        parser.error(f"{OPTIMISED_ROW!r} and 'torchntk SD' cannot be timed in one run (see OPTIMISED_ROW)")
    if args.quick:
        args.widths, args.outputs = [128, 256], [10]
    if args.smoke:
        args.widths, args.outputs, args.n = [8], [2], 2
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    payload = c.run_benchmark(
        "anchors",
        __doc__,
        args,
        run,
        lambda points: table(points, args.widths, args.outputs, args.rows),
        converter_needed="torchntk SD" in args.rows,
    )
    return payload


if __name__ == "__main__":
    main(sys.argv[1:])
