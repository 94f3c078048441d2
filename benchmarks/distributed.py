"""Tiles shared among torch.distributed ranks: throughput vs processes, load balance, the digits kernel, a projection.

Measured here (gloo ranks forked on this machine, a FileStore, one torch thread per rank):

* **scaling** — one kernel (the digits CNN on ``--scaling-examples`` digits, traced, Jacobian contraction, 50 examples
  per tile side) with 1 and 2 processes: tiles/s (median of ``--repeats`` runs, side by side). More processes are
  *simulated*: the tiles' measured times (1 process) handed out in claim order to P workers that each take the next
  tile when free, plus the measured cost of one claim (``store.add`` on the FileStore) per tile.
* **imbalance** — 2 processes, rank 1 slowed (it sleeps as long as the median tile takes, after each tile): tiles per
  rank, max/min, and the wall time against a static half/half split.
* **digits** — ``examples/digits.py`` (all 1,797 digits) with 1 and 2 processes: kernel time and test accuracy.
* **projection** — the 50,000-example CIFAR-10 kernel of resnet18 at 32×32 (traced over the 10 logits, x2=None) on
  8 GPUs: per-tile costs of resnet18 measured here at 1 and 2 examples per side (Jacobians, contraction), the
  multiply-adds they imply for the whole kernel, and a time at an *assumed* sustained GPU rate (stated in the JSON).
  A projection, not a measurement: no GPU on this machine.

Run: ``python benchmarks/distributed.py`` (about 10 minutes here) → ``benchmarks/results/distributed.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "examples"))

from _common import RESULTS, load_average, machine, write_json  # noqa: E402

import torchntk  # noqa: E402
from torchntk import _distributed  # noqa: E402

CHUNK = 50
# Assumed sustained rate of one data-centre GPU on resnet18's VJPs and the float32 contraction (multiply-adds/s):
# about a third of an H100's 67 TFLOP/s float32 peak. An assumption for the projection, not a measurement.
ASSUMED_GPU_MACS_PER_S = 1.0e13
CIFAR_EXAMPLES, GPUS, GPU_CHUNK = 50_000, 8, 48


def _rank(rank: int, world: int, init_file: str, examples: int, slow_rank: int, delay: float, out: str) -> None:
    import digits

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=datetime.timedelta(0, 600)
    )
    images, _ = digits.digits(examples)
    module = sys.modules["torchntk.torch_native.jacobian_contraction"]
    real = module.contract_jacobians
    if rank == slow_rank:

        def slowed(*args):
            result = real(*args)
            time.sleep(delay)
            return result

        module.contract_jacobians = slowed
    small = images[:2]  # warm-up: torch.func's first vmap/jacrev costs seconds, once per process
    torchntk.ntk(digits.small_cnn(), small, trace_axes=-1, implementation="jacobian_contraction", distributed=False)
    dist.barrier()
    start, cpu_start = time.perf_counter(), time.process_time()
    torchntk.ntk(digits.small_cnn(), images, trace_axes=-1, implementation="jacobian_contraction", chunk_size=CHUNK)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    schedule = _distributed.last_schedule
    record = {"tiles": len(schedule.claimed), "wall_s": wall, "cpu_s": cpu, "tile_seconds": schedule.tile_seconds}
    Path(out, f"rank{rank}.json").write_text(json.dumps(record))
    dist.destroy_process_group()


def run_ranks(world: int, examples: int, slow_rank: int = -1, delay: float = 0.0) -> list[dict]:
    with tempfile.TemporaryDirectory() as directory:
        torch.multiprocessing.start_processes(
            _rank,
            args=(world, os.path.join(directory, "pg"), examples, slow_rank, delay, directory),
            nprocs=world,
            start_method="fork",
        )
        return [json.loads(Path(directory, f"rank{r}.json").read_text()) for r in range(world)]


def claim_seconds(claims: int = 500) -> float:
    """One ``store.add`` on a FileStore (what claiming a tile costs)."""
    with tempfile.TemporaryDirectory() as directory:
        store = dist.FileStore(os.path.join(directory, "store"), 1)
        start = time.perf_counter()
        for _ in range(claims):
            store.add("next", 1)
        return (time.perf_counter() - start) / claims


def simulate(tile_seconds: list[float], workers: int, claim: float) -> float:
    """Wall time of dynamic claiming: each tile (in order) goes to the worker that is free first."""
    free = [0.0] * workers
    for seconds in tile_seconds:
        worker = min(range(workers), key=free.__getitem__)
        free[worker] += claim + seconds
    return max(free)


def scaling(examples: int, repeats: int) -> dict:
    runs: dict[int, list[list[dict]]] = {1: [], 2: []}
    for _ in range(repeats):  # side by side: load changes hit both process counts alike
        for world in runs:
            runs[world].append(run_ranks(world, examples))
    tiles = runs[1][0][0]["tiles"]
    measured = {}
    for world, results in runs.items():
        walls = [max(r["wall_s"] for r in ranks) for ranks in results]
        measured[world] = {
            "wall_s_median": statistics.median(walls),
            "tiles_per_s": tiles / statistics.median(walls),
            # CPU seconds of all ranks together: equal for 1 and 2 processes when sharing the tiles costs nothing
            "cpu_s_all_ranks_median": statistics.median(sum(r["cpu_s"] for r in ranks) for ranks in results),
            "tile_s_median_per_rank": [statistics.median(r["tile_seconds"]) for r in results[0]],
            "tiles_per_rank_first_run": [r["tiles"] for r in results[0]],
        }
    tile_seconds = min(runs[1], key=lambda ranks: ranks[0]["wall_s"])[0]["tile_seconds"]
    claim = claim_seconds()
    simulated = {}
    for workers in (1, 2, 4, 8, 16, 32):
        wall = simulate(tile_seconds, workers, claim)
        simulated[workers] = {
            "wall_s": wall,
            "tiles_per_s": tiles / wall,
            "efficiency": sum(tile_seconds) / wall / workers,
        }
    return {
        "examples": examples,
        "chunk": CHUNK,
        "tiles": tiles,
        "measured": measured,
        "speedup_2_over_1": measured[1]["wall_s_median"] / measured[2]["wall_s_median"],
        "claim_seconds": claim,
        "tile_seconds_median": statistics.median(tile_seconds),
        "simulated": simulated,
    }


def imbalance(examples: int, delay: float) -> dict:
    ranks = run_ranks(2, examples, slow_rank=1, delay=delay)
    tiles = [r["tiles"] for r in ranks]
    per_tile = [statistics.median(r["tile_seconds"]) for r in ranks]
    static = max(sum(tiles) / 2 * t for t in per_tile)  # half of the tiles each, as a static split would give
    return {
        "slowed_rank": 1,
        "delay_s_per_tile": delay,
        "tiles_per_rank": tiles,
        "max_over_min": max(tiles) / max(min(tiles), 1),
        "median_tile_s_per_rank": per_tile,
        "wall_s": max(r["wall_s"] for r in ranks),
        "static_split_wall_s_estimate": static,
    }


def digits_runs(examples: int | None) -> dict:
    results = {}
    for processes in (1, 2):
        with tempfile.TemporaryDirectory() as directory:
            out = Path(directory, "digits.json")
            command = [sys.executable, str(HERE.parent / "examples" / "digits.py"), "--processes", str(processes)]
            command += ["--json", str(out), "--plot", str(Path(directory, "plot.png"))]
            if examples:
                command += ["--examples", str(examples)]
            start = time.perf_counter()
            subprocess.run(command, check=True, capture_output=True, text=True, timeout=1800)
            result = json.loads(out.read_text())
            results[processes] = {
                "kernel_seconds": result["kernel_seconds"],
                "script_wall_s": time.perf_counter() - start,
                "accuracy": result["accuracy"],
                "examples": result["examples"],
                "condition_number": result["condition_number"],
                "top_eigenvalues": result["top_eigenvalues"],
            }
    return results


def projection() -> dict:
    """resnet18 (32×32, 10 logits, traced): Jacobians per example and contraction per pair measured here, scaled."""
    import torchvision

    from torchntk._auto import forward_flops
    from torchntk._problem import prepare
    from torchntk.torch_native.jacobian_contraction import _flat, batch_jacobians, contract_jacobians

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    problem = prepare(model, x, None, params=None, trace_axes=-1, diagonal_axes=())
    with torch.no_grad():
        jacobians = _flat(problem, batch_jacobians(problem, (x,)))  # warm-up
        jacobian_s = statistics.median(
            _timed(lambda: _flat(problem, batch_jacobians(problem, (x,)))) for _ in range(3)
        ) / len(x)
        contraction_s = (
            statistics.median(_timed(lambda: contract_jacobians(problem, jacobians, jacobians)) for _ in range(3))
            / len(x) ** 2
        )
    params, fp = problem.num_params, forward_flops(problem)
    n, c = CIFAR_EXAMPLES, GPU_CHUNK
    tiles = (n // c + 1) * (n // c + 2) // 2
    jacobian_examples = tiles * 2 * c  # each tile builds both sides' Jacobians (an upper bound: rows are reused)
    pairs = n * (n + 1) / 2
    jacobian_macs = jacobian_examples * 10 * 3 * fp  # O VJPs of about 3 forward passes each
    contraction_macs = pairs * 10 * params  # traced: O·P per pair
    total = jacobian_macs + contraction_macs
    cpu_seconds = jacobian_examples * jacobian_s + pairs * contraction_s
    return {
        "what": "PROJECTION (no GPU here): resnet18, CIFAR-10 32x32, 50,000 examples, trace_axes=-1, x2=None, 8 GPUs",
        "measured_here": {
            "jacobian_s_per_example": jacobian_s,
            "contraction_s_per_pair": contraction_s,
            "macs_per_s_jacobians": 10 * 3 * fp / jacobian_s,
            "macs_per_s_contraction": 10 * params / contraction_s,
        },
        "params": params,
        "forward_macs_per_example": fp,
        "chunk_on_gpu": c,
        "tiles": tiles,
        "multiply_adds": {"jacobians": jacobian_macs, "contraction": contraction_macs, "total": total},
        "assumed_gpu_macs_per_s": ASSUMED_GPU_MACS_PER_S,
        "projected_hours_8_gpus": total / ASSUMED_GPU_MACS_PER_S / GPUS / 3600,
        "projected_hours_8_cpu_processes_like_this_machine": cpu_seconds / GPUS / 3600,
    }


def _timed(call) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scaling-examples", type=int, default=600)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--digits-examples", type=int, default=None, help="default all 1,797")
    parser.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    parser.add_argument("--out", default=str(RESULTS / "distributed.json"))
    args = parser.parse_args()
    if args.quick:
        args.scaling_examples, args.repeats, args.digits_examples = 150, 1, 150
    started, load_before = time.perf_counter(), load_average()
    payload = {"benchmark": "distributed", "description": __doc__, "config": vars(args), "machine": machine()}
    payload["load_average_before"] = load_before
    payload["scaling"] = scaling(args.scaling_examples, args.repeats)
    print(json.dumps(payload["scaling"], indent=1)[:1500], flush=True)
    payload["imbalance"] = imbalance(args.scaling_examples, payload["scaling"]["tile_seconds_median"])
    print(json.dumps(payload["imbalance"]), flush=True)
    payload["digits"] = digits_runs(args.digits_examples)
    print(json.dumps(payload["digits"]), flush=True)
    payload["projection"] = projection()
    print(json.dumps(payload["projection"], indent=1), flush=True)
    payload["load_average_after"] = load_average()
    payload["wall_s"] = time.perf_counter() - started
    write_json(Path(args.out), payload)


if __name__ == "__main__":
    main()
