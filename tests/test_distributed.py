"""torchntk.ntk under torch.distributed: 2-3 gloo ranks started here (forkserver, a FileStore on tmp_path, no port).

Each rank writes what it got into tmp_path; the test compares: the distributed kernel equals the same call in one
process bit for bit (the same tiles run), on every rank; tiles go to the faster rank; a rank killed by SIGKILL
leaves a memmap whose re-run (another world size) computes only the missing tiles.
"""

from __future__ import annotations

import datetime
import importlib
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _oracle import oracle_ntk
from _zoo import make

import torchntk
from torchntk import _distributed
from torchntk._problem import prepare
from torchntk._store import JOURNAL_SUFFIX
from torchntk._tiles import kernel_tiles

jc_module = importlib.import_module("torchntk.torch_native.jacobian_contraction")

# name -> (zoo model, n1, n2 (None: x2=None), ntk keyword arguments, inputs from a Dataset, out=: a shared memmap
# (True), a path store every rank opens ("npy" / "zarr", created by whichever rank comes first), or none)
CASES = {
    "n1_ne_n2": ("cnn_bn", 7, 5, {"implementation": "jacobian_contraction", "chunk_size": 2}, False, False),
    "x2_none": ("residual", 7, None, {"implementation": "ntk_vector_products", "chunk_size": 3}, False, False),
    "trace_diagonal": (
        "conv_map",
        5,
        4,
        {"implementation": "jacobian_contraction", "chunk_size": 2, "trace_axes": (1,), "diagonal_axes": (-1,)},
        False,
        False,
    ),
    "paired": ("mlp", 6, 6, {"implementation": "ntk_vector_products", "chunk_size": 2, "diagonal_axes": (0,)}, 0, 0),
    "dataset": ("two_inputs", 7, None, {"implementation": "jacobian_contraction", "chunk_size": 3}, True, False),
    "dataset_memmap": ("tied", 6, 5, {"implementation": "ntk_vector_products", "chunk_size": 2}, True, True),
    "memmap_x2_none": ("cnn_bn", 7, None, {"implementation": "jacobian_contraction", "chunk_size": 2}, False, True),
    "npy_store": ("residual", 6, 5, {"implementation": "jacobian_contraction", "chunk_size": 2}, False, "npy"),
    "zarr_store_x2_none": ("mlp", 7, None, {"implementation": "ntk_vector_products", "chunk_size": 2}, True, "zarr"),
    "two_shapes": ("pooled", 5, 4, {"implementation": "jacobian_contraction", "chunk_size": 2}, False, "npy"),
}
# zoo models whose x2 is given examples of another shape than x1's (adaptive pooling takes both)
X2_SHAPES = {"pooled": (2, 6, 5)}
STRUCTURED = {"structured": ("mlp", 5, None, {"implementation": "structured_derivatives", "chunk_size": 2}, 0, 0)}
_TIMEOUT = 300


def _inputs(name: str, n1: int, n2: int | None, dataset: bool):
    model, x1, x2 = make(name, n1=n1, n2=n2 or 1)
    x2 = None if n2 is None else x2
    if x2 is not None and name in X2_SHAPES:
        x2 = (torch.randn(n2, *X2_SHAPES[name], dtype=x2[0].dtype, generator=torch.Generator().manual_seed(1)),)
    if dataset:  # (inputs..., label) items: the model takes all but the label
        labels = torch.arange(n1)
        keys = tuple(range(len(x1)))
        x1 = torchntk.DatasetInputs(torch.utils.data.TensorDataset(*x1, labels), input_key=keys, num_workers=1)
    return model, x1, x2


def _barrier(out_dir: Path, name: str, rank: int, world: int) -> None:
    (out_dir / f"{name}.{rank}").touch()
    while not all((out_dir / f"{name}.{r}").exists() for r in range(world)):
        time.sleep(0.01)


def _run_cases(rank: int, world: int, out_dir: Path, cases: dict) -> None:
    claimed = {}
    for case, (name, n1, n2, kwargs, dataset, memmap) in cases.items():
        model, x1, x2 = _inputs(name, n1, n2, dataset)
        out = None
        if isinstance(memmap, str):
            out = str(out_dir / f"{case}.{memmap}")
        elif memmap:
            shape = prepare(model, x1, x2, params=None, trace_axes=(), diagonal_axes=()).kernel_shape()
            path = out_dir / f"{case}.npy"
            if rank == 0:
                np.lib.format.open_memmap(path, "w+", np.float64, shape).flush()
            _barrier(out_dir, f"{case}.created", rank, world)
            out = np.lib.format.open_memmap(path, "r+")
        kernel = torchntk.ntk(model, x1, x2, out=out, **kwargs)
        claimed[case] = len(_distributed.last_schedule.claimed)
        np.save(out_dir / f"{case}.rank{rank}.npy", kernel.numpy())
        if rank == 0:
            local = torchntk.ntk(model, x1, x2, distributed=False, **kwargs)
            np.save(out_dir / f"{case}.local.npy", local.numpy())
    (out_dir / f"claimed.rank{rank}.json").write_text(json.dumps(claimed))


def _slow_rank(rank: int, world: int, out_dir: Path) -> None:
    real = jc_module.contract_jacobians

    def slow(*args):
        time.sleep(0.25 if rank == 1 else 0.0)
        return real(*args)

    jc_module.contract_jacobians = slow
    model, x1, x2 = make("mlp", n1=6, n2=4)
    torchntk.ntk(model, x1, x2, implementation="jacobian_contraction", chunk_size=1)
    (out_dir / f"claimed.rank{rank}.json").write_text(json.dumps(len(_distributed.last_schedule.claimed)))


def _killed_run(rank: int, world: int, out_dir: Path, kill: bool) -> None:
    real = jc_module.contract_jacobians
    calls = {"n": 0}

    def dying(*args):
        calls["n"] += 1
        if kill and rank == 1 and calls["n"] == 3:
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(0.05)  # so that rank 0 is still working when rank 1 dies
        return real(*args)

    jc_module.contract_jacobians = dying
    model, x1, x2 = make("residual", n1=6, n2=5)
    out = np.lib.format.open_memmap(out_dir / "killed.npy", "r+")
    torchntk.ntk(model, x1, x2, implementation="jacobian_contraction", chunk_size=1, out=out)
    (out_dir / f"claimed.rank{rank}.json").write_text(json.dumps(len(_distributed.last_schedule.claimed)))


# what rank 1 changes -> the part of the kernel's key its refusal must name
MISMATCHES = {
    "weights": "parameter values",
    "inputs": "inputs",
    "trace_axes": "layout",
    "params": "parameter selection",
    "out": "output",
}


def _mismatched_ranks(rank: int, out_dir: Path) -> None:
    """Rank 1 differs from rank 0 in one way per call: both ranks refuse, naming what differs."""
    refusals = {}
    for what in MISMATCHES:
        model, x1, _ = make("mlp", n1=4, n2=1)
        kwargs = {"implementation": "jacobian_contraction", "chunk_size": 2}
        if rank == 1 and what == "weights":
            with torch.no_grad():
                next(model.parameters()).add_(1e-3)
        if rank == 1 and what == "inputs":
            x1 = tuple(x + 1e-3 for x in x1)
        if rank == 1 and what == "trace_axes":
            kwargs["trace_axes"] = (-1,)
        if rank == 1 and what == "params":
            kwargs["params"] = [next(iter(dict(model.named_parameters())))]
        if rank == 0 and what == "out":
            kwargs["out"] = str(out_dir / "kernel.npy")
        try:
            torchntk.ntk(model, x1, **kwargs)
            refusals[what] = None
        except ValueError as error:
            refusals[what] = str(error)
    # Last (the ranks' call counts part here): rank 1 computes alone; rank 0 waits for it until the store's timeout.
    dist.distributed_c10d._get_default_store().set_timeout(datetime.timedelta(seconds=3))
    try:
        torchntk.ntk(model, x1, implementation="jacobian_contraction", distributed=rank == 0)
        refusals["opt-out"] = None
    except ValueError as error:
        refusals["opt-out"] = str(error)
    (out_dir / f"refusals.rank{rank}.json").write_text(json.dumps(refusals))


def _rank_main(rank: int, world: int, init_file: str, job: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120)
    )
    try:
        if job == "cases":
            _run_cases(rank, world, Path(out_dir), CASES)
        elif job == "structured":
            _run_cases(rank, world, Path(out_dir), STRUCTURED)
        elif job == "slow_rank":
            _slow_rank(rank, world, Path(out_dir))
        elif job == "mismatch":
            _mismatched_ranks(rank, Path(out_dir))
        elif ":" in job:  # "module:function" of another test file's ranks
            module, function = job.split(":")
            getattr(importlib.import_module(module), function)(rank, world, Path(out_dir))
        else:
            _killed_run(rank, world, Path(out_dir), kill=job == "kill")
    finally:
        dist.destroy_process_group()


def launch(job: str, world: int, out_dir: Path, start_method: str = "forkserver") -> None:
    """Run ``job`` on ``world`` ranks; every rank is stopped when this returns or raises.

    Ranks fork from a forkserver (a clean process with torch, torchntk and torch.func's lazy imports preloaded by
    ``_warm_ranks``, started once per session): they start at once, and no thread of this process (JAX,
    TensorFlow, OpenMP: not fork-safe) is forked with them. Structured derivatives (JAX) run in spawned ranks.
    """
    saved = os.environ.get("PYTHONPATH")
    if start_method == "forkserver":  # the server imports its preload by PYTHONPATH (not sys.path, Python 3.11)
        mp.get_context("forkserver").set_forkserver_preload(["_warm_ranks"])
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).parent), saved]))
    init_file = out_dir / f"pg-{job}-{world}-{time.monotonic_ns()}"
    try:
        context = mp.start_processes(
            _rank_main,
            args=(world, str(init_file), job, str(out_dir)),
            nprocs=world,
            join=False,
            start_method=start_method,
        )
    finally:
        if saved is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved
    deadline = time.monotonic() + _TIMEOUT
    try:
        while not context.join(timeout=1):
            assert time.monotonic() < deadline, f"distributed job {job!r} did not finish in {_TIMEOUT} s"
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
                process.join()


def _claimed(out_dir: Path, world: int) -> list:
    return [json.loads((out_dir / f"claimed.rank{rank}.json").read_text()) for rank in range(world)]


def _check_cases(out_dir: Path, cases: dict, world: int) -> None:
    claimed = _claimed(out_dir, world)
    for case, (name, n1, n2, kwargs, _, _) in cases.items():
        local = np.load(out_dir / f"{case}.local.npy")
        for rank in range(world):
            got = np.load(out_dir / f"{case}.rank{rank}.npy")
            assert got.shape == local.shape and np.array_equal(got, local), (case, rank)
        model, x1, x2 = _inputs(name, n1, n2, False)
        axes = {k: v for k, v in kwargs.items() if k in ("trace_axes", "diagonal_axes")}
        problem = prepare(model, x1, x2, params=None, trace_axes=(), diagonal_axes=axes.get("diagonal_axes", ()))
        # every tile once among the ranks (x2=None: the upper triangle only)
        assert sum(c[case] for c in claimed) == len(kernel_tiles(problem, kwargs["chunk_size"])), case
        expected = oracle_ntk(model, x1, x2, **axes)
        assert np.allclose(local, expected.numpy(), rtol=1e-10, atol=1e-12), case


def test_distributed_kernel_equals_one_process(tmp_path):
    launch("cases", 2, tmp_path)
    _check_cases(tmp_path, CASES, 2)


def test_ranks_computing_different_kernels_refuse_naming_what_differs(tmp_path):
    """Before, the refusal quoted the first 200 characters of the whole key, the same on both ranks."""
    launch("mismatch", 2, tmp_path)
    for rank in range(2):
        refusals = json.loads((tmp_path / f"refusals.rank{rank}.json").read_text())
        for what, part in MISMATCHES.items():
            message = refusals[what]
            assert message is not None, (rank, what)
            assert f"ranks [1] compute a different kernel than rank 0 (what differs from rank 0's — rank 1: {part}" in (
                message
            ), (rank, what, message)
        opt_out = refusals["opt-out"]
        if rank == 0:
            assert "ranks [1] did not reach this distributed torchntk call" in opt_out, opt_out
        else:
            assert opt_out is None  # distributed=False: computed alone


@pytest.mark.slow
def test_distributed_structured_derivatives(tmp_path):
    launch("structured", 2, tmp_path, start_method="spawn")
    _check_cases(tmp_path, STRUCTURED, 2)


def test_a_slow_rank_takes_fewer_tiles(tmp_path):
    launch("slow_rank", 2, tmp_path)
    fast, slow = _claimed(tmp_path, 2)
    assert fast + slow == 6 * 4
    assert slow < fast, (fast, slow)


def test_sigkill_of_a_rank_then_rerun_computes_only_the_missing_tiles(tmp_path):
    model, x1, x2 = make("residual", n1=6, n2=5)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks: the same reduction order, so the same bits
    try:
        clean = torchntk.ntk(model, x1, x2, implementation="jacobian_contraction", chunk_size=1)
    finally:
        torch.set_num_threads(threads)
    np.lib.format.open_memmap(tmp_path / "killed.npy", "w+", np.float64, tuple(clean.shape)).flush()
    with pytest.raises(mp.ProcessExitedException, match="SIGKILL"):
        launch("kill", 2, tmp_path)
    # recorded tiles, not the temporary file of a record the kill interrupted (written atomically: never a record)
    tiles = Path(f"{tmp_path / 'killed.npy'}{JOURNAL_SUFFIX}", "tiles").iterdir()
    done = len([path for path in tiles if not path.name.startswith(".tmp-")])
    assert 0 < done < 30, done
    launch("resume", 3, tmp_path)  # another world size
    assert sum(_claimed(tmp_path, 3)) == 30 - done
    kernel = np.load(tmp_path / "killed.npy")
    assert np.array_equal(kernel, clean.numpy())


def test_distributed_true_without_a_group_says_how_to_launch(monkeypatch):
    for name in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    model, x1, x2 = make("mlp")
    with pytest.raises(ValueError, match="torchrun"):
        torchntk.ntk(model, x1, x2, distributed=True)


@pytest.mark.slow  # two torchrun launches: about 50 s on the loaded 2-core machine
def test_torchrun_cli_on_digits_writes_the_kernel_and_resumes(tmp_path):
    path = tmp_path / "digits.npy"
    example = Path(__file__).resolve().parents[1] / "examples" / "digits.py"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    command += ["-m", "torchntk", "ntk", "--model", f"{example}:small_cnn", "--data", "digits", "--batch-limit", "60"]
    command += ["--trace-axes", "-1", "--chunk-size", "20", "--implementation", "jacobian_contraction"]
    command += ["--out", str(path)]
    for run in range(2):
        done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
        assert "running jacobian_contraction" in done.stdout and "2 process(es)" in done.stdout, done.stdout
        tiles = int(re.search(r"tiles: (\d+) on rank 0", done.stdout).group(1))
        assert (tiles > 0) if run == 0 else (tiles == 0), done.stdout  # the re-run finds every tile journaled
    spec = importlib.util.spec_from_file_location("digits_example", example)
    digits = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(digits)
    images, _ = digits.digits(60)
    expected = torchntk.ntk(digits.small_cnn(), images, trace_axes=-1, implementation="jacobian_contraction")
    assert np.allclose(np.load(path), expected.numpy(), rtol=1e-12, atol=1e-13)  # threads differ: not bit for bit
