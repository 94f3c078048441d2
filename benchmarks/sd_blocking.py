"""Structured derivatives with output blocking (issue 11): peak memory and time against ``max_memory``.

Each point runs in its own child process (``_common.probe``: forkserver, RSS watched and capped). The child
converts the model, calls ``torchntk.ntk(..., implementation="structured_derivatives", max_memory=M)`` once cold
and (for small cases) once warm, and reports the peak RSS above its baseline and the call times; the kernel's
relative difference to the unblocked (largest ``max_memory``) kernel of the same case is reported as well.

Cases:

* ``peak``: resnet18 at 32×32 with ``O = 256`` outputs, ``N = 2``, ``trace_axes=(-1,)``, ``x2=None``, for
  ``max_memory`` from "no limit" down to 250 MB (peak of the warm call): issue 11's memory test on a real network.
* ``trace``: resnet18 at 224×224, ``O = 1000``, ``trace_axes=(-1,)``, ``N = 8`` (one cold call); ``trace-small``: the
  same at 64×64 with ``N = 2`` (minutes: a rehearsal); ``trace-32``: at 32×32 with ``N = 4`` (a minute or two).
  Their entries of examples 0 and 1 are checked against explicit per-output gradients (``torch.autograd``, every
  one of the 1000 outputs): ``spot_check_error``.
* ``full``: the full ``1000 × 1000`` NTK of resnet18 at 224×224 for one pair (``x1``, ``x2`` of one example each),
  one cold call, within ``--memory-gb`` (default 20 GB). Needs most of the machine: run it alone.
* ``full-self``: as ``full`` with ``x2=None`` (Θ(x, x), the kernel's diagonal block): only the upper triangle of
  output blocks is computed and mirrored.

Unblocked, no method computes the ``full`` kernels here (one pair needs ~94–140 GB), so their entries are checked on
a few rows and columns against explicit per-row gradients (``torch.autograd``, float32): ``spot_check_error``.
``--implementation ntk_vector_products`` runs a case with NTK-vector products instead, whose rows of ``J(x2)`` are
built a block of outputs at a time under ``max_memory`` (results in ``sd_blocking_<case>_nvp.json``);
``--implementation jacobian_contraction`` with Jacobian contraction, whose rows of both sides are built a block at a
time where the outputs are traced (``sd_blocking_<case>_jc.json``).

Usage::

    python benchmarks/sd_blocking.py peak
    python benchmarks/sd_blocking.py trace --memory-gb 20
    python benchmarks/sd_blocking.py full --memory-gb 20
    python benchmarks/sd_blocking.py full --memory-gb 20 --max-memory-gb 12 --implementation ntk_vector_products
"""

from __future__ import annotations

import argparse
import sys

import _common as c
import numpy as np

CASES = {
    "peak": {"model": "resnet18", "R": 32, "O": 256, "N": 2, "x2": False, "trace": (-1,), "warm": True},
    "trace": {"model": "resnet18", "R": 224, "O": 1000, "N": 8, "x2": False, "trace": (-1,), "warm": False},
    "trace-small": {"model": "resnet18", "R": 64, "O": 1000, "N": 2, "x2": False, "trace": (-1,), "warm": False},
    "trace-32": {"model": "resnet18", "R": 32, "O": 1000, "N": 4, "x2": False, "trace": (-1,), "warm": False},
    "full": {"model": "resnet18", "R": 224, "O": 1000, "N": 1, "x2": True, "trace": (), "warm": False},
    "full-self": {"model": "resnet18", "R": 224, "O": 1000, "N": 1, "x2": False, "trace": (), "warm": False},
}
SPOT_ROWS = (0, 1, 499, 998, 999)
SUFFIX = {"structured_derivatives": "", "ntk_vector_products": "_nvp", "jacobian_contraction": "_jc"}
PEAK_MEMORY_GB = [None, 1.0, 0.25]


def build(spec: dict) -> tuple:
    import torch
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.get_model(spec["model"], weights=None, num_classes=spec["O"]).eval()
    generator = torch.Generator().manual_seed(1)
    shape = (spec["N"], 3, spec["R"], spec["R"])
    x1 = torch.randn(shape, generator=generator)
    return model, x1, torch.randn(shape, generator=generator) if spec["x2"] else None


def target(spec: dict, budget_s: float) -> dict:
    """In the child: one case at one ``max_memory``; the kernel is saved for the comparison."""
    import numpy as np
    import torch

    import torchntk
    from torchntk._problem import prepare
    from torchntk._tiles import TileOptions
    from torchntk.bridge.memory_plan import choose_blocks
    from torchntk.torch_native.jacobian_contraction import bytes_per_example as jc_bytes_per_example
    from torchntk.torch_native.ntk_vector_products import output_block
    from torchntk.torch_native.output_blocks import contraction_block

    model, x1, x2 = build(spec)
    problem = prepare(model, x1, x2, params=None, trace_axes=spec["trace"], diagonal_axes=())
    structured = spec["implementation"] == "structured_derivatives"
    options = TileOptions(max_memory=spec["max_memory"])
    if structured:
        choice = choose_blocks(problem, options)
        blocks = {"chunk": choice.chunk, "rows": choice.rows, "estimated_bytes_per_example": choice.per_example}
    elif spec["implementation"] == "jacobian_contraction":
        blocks = {"rows": contraction_block(problem, options, jc_bytes_per_example(problem)) or problem.out_size}
    else:
        blocks = {"rows": output_block(problem, options) or problem.out_size}

    def call() -> torch.Tensor:
        kernel = torchntk.ntk(
            model,
            x1,
            x2,
            implementation=spec["implementation"],
            trace_axes=spec["trace"],
            max_memory=spec["max_memory"],
            progress=False,
        )
        np.save(spec["kernel_path"], kernel.numpy())
        return kernel

    def convert() -> float:
        import time

        from torchntk.converters import to_jax

        start = time.perf_counter()
        to_jax(model, (x1,), params=[name for name, _ in model.named_parameters()])
        return time.perf_counter() - start

    result = c.measure_calls(convert if structured else lambda: None, call, budget_s, warm=spec["warm"])
    kernel = np.load(spec["kernel_path"])
    other = x1 if x2 is None else x2
    traced = spot_check_traced(model, x1, other, kernel) if spec["trace"] else spot_check(model, x1, other, kernel)
    return {**result, **blocks, "spot_check_error": traced}


def spot_check_traced(model, x1, x2, kernel) -> float:
    """Largest relative difference of the traced ``kernel[n, m]`` for ``n, m`` in {0, 1} (``x2 = x1``) from
    ``(1/O) Σ_o g_{n,o}·g_{m,o}``, with ``g_{n,o}`` the explicit gradient of output ``o`` at ``x[n]`` (one backward
    per output and example)."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    examples = [(0, x1), (1, x1)] if x2 is x1 else [(0, x1), (0, x2)]
    outs = [model(x[n : n + 1])[0] for n, x in examples]
    sums = torch.zeros(2, 2, dtype=torch.float64)
    for o in range(outs[0].numel()):
        rows = [
            torch.cat([g.reshape(-1) for g in torch.autograd.grad(out[o], params, retain_graph=True)]).double()
            for out in outs
        ]
        sums += torch.stack([torch.stack([a @ b for b in rows]) for a in rows])
    expected = (sums / outs[0].numel()).numpy()
    got = kernel[:2, :2] if x2 is x1 else kernel[np.ix_([0], [0])]
    expected = expected if x2 is x1 else expected[np.ix_([0], [1])]
    return float(np.abs(got - expected).max() / np.abs(expected).max())


def spot_check(model, x1, x2, kernel) -> float:
    """Largest relative difference of ``kernel[0, 0][a, b]`` for a, b in :data:`SPOT_ROWS` from the inner product
    of the explicit gradients of output rows ``a`` (at ``x1[0]``) and ``b`` (at ``x2[0]``)."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]

    def gradients(x: torch.Tensor) -> list[torch.Tensor]:
        rows = []
        for a in SPOT_ROWS:
            out = model(x[:1])[0, a]
            rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(out, params)]))
        return rows

    g1, g2 = gradients(x1), gradients(x2)
    expected = torch.stack([torch.stack([(a.double() * b.double()).sum() for b in g2]) for a in g1]).numpy()
    got = kernel[0, 0][np.ix_(SPOT_ROWS, SPOT_ROWS)]
    return float(np.abs(got - expected).max() / np.abs(expected).max())


def run(args: argparse.Namespace) -> dict:
    import tempfile
    from pathlib import Path

    import numpy as np

    limit = c.memory_limit_bytes(args.memory_gb)
    spec = dict(CASES[args.case]) | {"implementation": args.implementation}
    budgets = PEAK_MEMORY_GB if args.case == "peak" else [args.max_memory_gb]
    folder = Path(tempfile.mkdtemp(prefix="sd-blocking-"))
    points, reference = [], None
    for gb in budgets:
        max_memory = int(gb * c.GB) if gb else int(limit)
        point_spec = {**spec, "max_memory": max_memory, "kernel_path": str(folder / f"{gb}.npy")}
        result = c.probe(target, point_spec, memory_limit=limit, timeout_s=args.timeout_s, budget_s=args.budget_s)
        point = {**{k: v for k, v in point_spec.items() if k != "kernel_path"}, "max_memory_gb": gb, **result}
        if result.get("status") == "ok":
            kernel = np.load(point_spec["kernel_path"])
            reference = kernel if reference is None else reference
            point["relative_difference"] = float(np.abs(kernel - reference).max() / np.abs(reference).max())
            point["finite"] = bool(np.isfinite(kernel).all())
        points.append(point)
        print({k: point.get(k) for k in ("max_memory_gb", "status", "rows", "chunk", "peak_bytes", "warm_call_s")})
    return {"points": points, "memory_limit_bytes": limit}


def table(points: list[dict]) -> str:
    rows = []
    for p in points:
        method = p.get("implementation", "structured_derivatives")
        gb = f"{p['max_memory_gb']:g}" if p["max_memory_gb"] else "limit"
        single = p.get("warm_call_s") or p.get("first_call_s")
        rows.append(
            [
                f"{p['model']} {p['R']}×{p['R']} O={p['O']} N={p['N']} trace={p['trace']} {c.SHORT[method]}",
                gb,
                p.get("status"),
                p.get("rows", "—"),
                p.get("chunk", "—"),
                c.fmt_gb(p.get("increment_bytes")) if p.get("status") == "ok" else "—",
                c.fmt_gb(p.get("peak_bytes")) if p.get("status") == "ok" else "—",
                f"{single:.1f}" if single else "—",
                f"{p['relative_difference']:.1e}" if "relative_difference" in p else "—",
            ]
        )
    header = ["case", "max_memory GB", "status", "rows/block", "chunk", "peak − baseline GB", "peak GB", "call s"]
    header.append("rel. diff")
    return c.markdown_table(header, rows)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("case", choices=sorted(CASES))
    parser.add_argument("--max-memory-gb", type=float, default=None, help="trace/full: torchntk's max_memory")
    parser.add_argument("--timeout-s", type=float, default=3600.0)
    parser.add_argument(
        "--implementation",
        default="structured_derivatives",
        choices=list(SUFFIX),
    )
    c.add_run_options(parser, budget_help="a warm call slower than this is over budget", out=None)
    args = parser.parse_args(argv)
    args.budget_s = max(args.budget_s, 600.0) if args.case != "peak" else args.budget_s
    suffix = SUFFIX[args.implementation]
    args.out = args.out or c.RESULTS / f"sd_blocking_{args.case}{suffix}.json"
    structured = args.implementation == "structured_derivatives"
    return c.run_benchmark(f"sd_blocking_{args.case}{suffix}", __doc__, args, run, table, converter_needed=structured)


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
