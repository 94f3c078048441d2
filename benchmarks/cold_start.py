"""A user's first structured-derivatives call in a new process: cold cache, warm cache, against Jacobian contraction.

Per case (torchvision model, num_classes=10, float32, 32×32, N examples, ``x2 = None``) three fresh processes run
one ``torchntk.ntk`` call each and report the call's seconds and the whole process's (interpreter start and imports
included, measured by the parent):

* ``jc``: ``implementation="jacobian_contraction"`` (no cache involved); ``nvp``: the same with NTK-vector products,
* ``sd_cold``: ``implementation="structured_derivatives"`` with an empty ``TORCHNTK_CACHE_DIR`` (export, conversion,
  check, tracing, XLA compilation, run),
* ``sd_warm``: the same in a second process on the cache directory the cold one filled (no export, executables
  loaded from JAX's persistent compilation cache),

plus the cold process's breakdown (``JaxModel.timings``: export / route / check) and the persistent cache's
hit/write counts. Writes ``results/cold_start.json``.

Run: ``nice -n 10 python benchmarks/cold_start.py [--cases resnet18:4 convnext_small:2] [--timeout 900]``
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import RESULTS, load_average, markdown_table, write_json

OUT = RESULTS / "cold_start.json"
HERE = Path(__file__).resolve().parent

CHILD = r"""
import json, sys, time
start = time.perf_counter()
import torch, torchvision
import torchntk
imported = time.perf_counter() - start
name, n, implementation = sys.argv[1], int(sys.argv[2]), sys.argv[3]
torch.manual_seed(0)
model = torchvision.models.get_model(name, weights=None, num_classes=10).eval()
x = torch.randn(n, 3, 32, 32)
from torchntk.bridge import torch_glue
stages = {}
real_first_tile = torch_glue.compiled_first_tile
def compiled_first_tile(*args, **kwargs):  # the conversion's stage timings (export, route, check; or the disk cache)
    converted, first = real_first_tile(*args, **kwargs)
    stages.setdefault("timings", dict(converted.timings))
    return converted, first
torch_glue.compiled_first_tile = compiled_first_tile
start = time.perf_counter()
kernel = torchntk.ntk(model, x, implementation=implementation)
call = time.perf_counter() - start
row = {"import_s": imported, "call_s": call, "kernel_sum": float(kernel.double().sum())}
if implementation == "structured_derivatives":
    row["timings"] = stages.get("timings")
    try:  # a checkout without the persistent compilation cache ("before") has no counts
        from torchntk.converters.compile_cache import ValidatedCache as c
        row["cache"] = {"hits": c.hits, "misses": c.misses, "writes": c.writes, "rejected": c.rejected}
    except ImportError:
        pass
print("COLD-RESULT " + json.dumps(row), flush=True)
"""


SOURCE = HERE.parent  # the torchntk checkout the children import (--source: e.g. the main branch, for "before")


def run_child(name: str, n: int, implementation: str, cache_dir: str, timeout: float) -> dict:
    env = dict(os.environ, TORCHNTK_CACHE_DIR=cache_dir)
    env["PYTHONPATH"] = os.pathsep.join([str(SOURCE), env.get("PYTHONPATH", "")])
    start = time.perf_counter()
    try:
        done = subprocess.run(
            [sys.executable, "-c", CHILD, name, str(n), implementation],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
            cwd=cache_dir,  # `python -c` puts the working directory first on sys.path: a checkout there would win
        )
    except subprocess.TimeoutExpired:
        return {"failure": f"timeout ({timeout:.0f} s)", "process_s": time.perf_counter() - start}
    process = time.perf_counter() - start
    for line in done.stdout.splitlines():
        if line.startswith("COLD-RESULT "):
            return json.loads(line.removeprefix("COLD-RESULT ")) | {"process_s": process}
    return {"failure": done.stderr.strip().splitlines()[-1][:300] if done.stderr.strip() else "no result"}


def measure(name: str, n: int, timeout: float) -> dict:
    row: dict = {"model": name, "n": n, "load_before": load_average()}
    with tempfile.TemporaryDirectory(prefix="cold-start-") as cache_dir:
        row["source"] = str(SOURCE)
        row["jc"] = run_child(name, n, "jacobian_contraction", cache_dir, timeout)
        row["nvp"] = run_child(name, n, "ntk_vector_products", cache_dir, timeout)
        row["sd_cold"] = run_child(name, n, "structured_derivatives", cache_dir, timeout)
        row["sd_warm"] = run_child(name, n, "structured_derivatives", cache_dir, timeout)
    row["load_after"] = load_average()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=["resnet18:4", "convnext_small:2"])
    parser.add_argument("--timeout", type=float, default=900.0)
    parser.add_argument("--source", type=Path, default=HERE.parent, help="torchntk checkout to measure")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    global SOURCE
    SOURCE = args.source.resolve()
    rows = []
    for case in args.cases:
        name, n = case.split(":")
        rows.append(measure(name, int(n), args.timeout))
        print(json.dumps(rows[-1])[:600], flush=True)
        write_json(args.out, {"source": str(SOURCE), "rows": rows})

    def cell(r: dict, key: str) -> str:
        return r[key]["failure"] if "failure" in r[key] else f"{r[key]['call_s']:.2f} / {r[key]['process_s']:.2f}"

    header = ["model", "N", "JC first call / process s", "NVP first call / process s", "SD cold call / process s"]
    header.append("SD warm call / process s")
    print(
        markdown_table(
            header,
            [
                [
                    r["model"],
                    r["n"],
                    *(cell(r, key) if key in r else "—" for key in ("jc", "nvp", "sd_cold", "sd_warm")),
                ]
                for r in rows
            ],
        )
    )


if __name__ == "__main__":
    main()
