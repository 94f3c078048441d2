"""Kernel stores for out= (torchntk._store): a journal that cannot lie, resuming, refusing foreign stores.

Every kernel is compared with the float64 explicit-Jacobian oracle; "computed" counts the tiles a run contracted.
"""

from __future__ import annotations

import array
import importlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from _oracle import oracle_ntk
from torch import nn

import torchntk
from torchntk import _precision as precision
from torchntk._problem import prepare
from torchntk._store import JOURNAL_SUFFIX, open_store

jc_module = importlib.import_module("torchntk.torch_native.jacobian_contraction")
TESTS = Path(__file__).parent
REPO = TESTS.parent


class Net(nn.Module):
    def __init__(self, act=torch.tanh) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin1, self.lin2 = nn.Linear(4, 6), nn.Linear(6, 3)
        self.register_buffer("scale", torch.tensor([1.0, 2.0, 0.5]))
        self.act = act

    def forward(self, x):
        return self.lin2(self.act(self.lin1(x))) * self.scale


def inputs(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


X1, X2 = inputs(6), inputs(4, seed=2)


@pytest.fixture
def computed(monkeypatch):
    """Counts the tiles contracted by jacobian_contraction."""
    count = {"tiles": 0}
    real = jc_module.contract_jacobians

    def counting(*args):
        count["tiles"] += 1
        return real(*args)

    monkeypatch.setattr(jc_module, "contract_jacobians", counting)
    return count


def run(out, model=None, x1=X1, x2=X2, **kwargs):
    kwargs.setdefault("chunk_size", 2)
    model = model or Net().double()
    return torchntk.ntk(model, x1, x2, implementation="jacobian_contraction", out=out, **kwargs)


def oracle(model=None, x1=X1, x2=X2, **kwargs):
    model = model or Net().double()
    return oracle_ntk(model, (x1,), None if x2 is None else (x2,), **kwargs)


def assert_oracle(kernel, **kwargs):
    assert torch.allclose(torch.as_tensor(np.asarray(kernel)), oracle(**kwargs), rtol=1e-12, atol=1e-14)


def store_of(out, model=None, x1=X1, x2=X2, chunk=2):
    problem = prepare(model or Net().double(), x1, x2, params=None, trace_axes=(), diagonal_axes=())
    return open_store(out, problem, chunk, "jacobian_contraction")


def done_tiles(out, **kwargs) -> int:
    store = store_of(out, **kwargs)
    rows = [slice(i, min(i + 2, 6)) for i in range(0, 6, 2)]
    cols = [slice(j, min(j + 2, 4)) for j in range(0, 4, 2)]
    return sum(store.is_done(r, c) for r in rows for c in cols)


# ----------------------------------------------------------------------------------------------------------------
# The README recipe with an anonymous memmap: a journal that cannot lie.


def test_memmap_reopened_with_w_plus_recomputes_every_tile(tmp_path, computed):
    path = tmp_path / "kernel.npy"
    out = np.lib.format.open_memmap(path, "w+", np.float64, (6, 4, 3, 3))
    run(out)
    assert computed["tiles"] == 6
    out = np.lib.format.open_memmap(path, "w+", np.float64, (6, 4, 3, 3))  # the recipe again: zeroes the file
    assert_oracle(run(out))  # before: six zero tiles came back, the journal said "done"
    assert computed["tiles"] == 12
    out = np.load(path, mmap_mode="r+")  # the re-run recipe: nothing left to do
    assert_oracle(run(out))
    assert computed["tiles"] == 12


def test_memmap_of_another_model_discards_the_journal(tmp_path, computed):
    path = tmp_path / "kernel.npy"
    run(np.lib.format.open_memmap(path, "w+", np.float64, (6, 4, 3, 3)))
    relu = Net(torch.relu).double()  # same weights and buffers, another activation
    kernel = run(np.load(path, mmap_mode="r+"), model=relu)
    assert computed["tiles"] == 12
    assert_oracle(kernel, model=relu)


@pytest.mark.parametrize("mode", ["c", "r"])
def test_copy_on_write_or_read_only_memmap_is_refused(tmp_path, mode):
    path = tmp_path / "kernel.npy"
    np.lib.format.open_memmap(path, "w+", np.float64, (6, 4, 3, 3)).flush()
    with pytest.raises(ValueError, match="copy-on-write" if mode == "c" else "read-only"):
        run(np.load(path, mmap_mode=mode))
    assert not os.path.exists(f"{path}{JOURNAL_SUFFIX}")  # refused before anything was journaled


# ----------------------------------------------------------------------------------------------------------------
# Stores named by a path.


@pytest.mark.parametrize("suffix", [".npy", ".zarr"])
@pytest.mark.parametrize(
    "layout",
    [{}, {"x2": None}, {"trace_axes": (-1,)}, {"x2": None, "diagonal_axes": (0,)}],
    ids=["x1-x2", "x2-none", "traced", "paired"],
)
def test_path_store_equals_oracle_and_resumes_with_nothing_to_do(tmp_path, computed, suffix, layout):
    x2 = layout.get("x2", X2)
    axes = {k: v for k, v in layout.items() if k != "x2"}
    out = str(tmp_path / f"kernel{suffix}")
    kernel = run(out, x2=x2, **axes)
    assert_oracle(kernel, x2=x2, **axes)
    first = computed["tiles"]
    again = run(out, x2=x2, **axes)
    assert computed["tiles"] == first and torch.equal(kernel, again)


def test_zarr_through_an_fsspec_url(computed):
    url = f"memory://torchntk-test-{os.getpid()}-{time.time_ns()}.zarr"
    assert_oracle(run(url))
    assert_oracle(run(url))
    assert computed["tiles"] == 6


@pytest.mark.parametrize("suffix", [".npy", ".zarr"])
def test_damaged_tile_is_recomputed(tmp_path, computed, suffix):
    out = str(tmp_path / f"kernel{suffix}")
    run(out)
    if suffix == ".npy":
        data = np.load(out, mmap_mode="r+")
        data[2:4, 0:2] = 0.0  # one tile zeroed
        data[0, 3, 1, 1] += 1e-9  # one value of another tile nudged
        data.flush()
    else:
        import zarr

        zarr.open_group(out, mode="a")["kernel"][2:4, 0:2] = 0.0
    assert done_tiles(out) == (4 if suffix == ".npy" else 5)
    assert_oracle(run(out))
    assert computed["tiles"] == 6 + (2 if suffix == ".npy" else 1)


FOREIGN = {
    "activation": ({"model": Net(torch.relu).double()}, "architecture"),
    "buffer": ({"model": "buffer"}, "parameter values"),
    "weights": ({"model": "weights"}, "parameter values"),
    "inputs": ({"x1": inputs(6, seed=7)}, "inputs"),
    "x2 none": ({"x2": None, "x1": X1[:4]}, "layout"),
    "selection": ({"params": ["lin2.weight"]}, "parameter selection"),
}


def _foreign(case):
    kwargs, match = FOREIGN[case]
    kwargs = dict(kwargs)
    if kwargs.get("model") in ("buffer", "weights"):
        model = Net().double()
        with torch.no_grad():
            (model.scale if kwargs["model"] == "buffer" else model.lin1.bias).add_(0.25)
        kwargs["model"] = model
    return kwargs, match


@pytest.mark.parametrize("suffix", [".npy", ".zarr"])
@pytest.mark.parametrize("case", list(FOREIGN))
def test_store_of_another_problem_is_refused(tmp_path, suffix, case):
    out = str(tmp_path / f"kernel{suffix}")
    kwargs, match = _foreign(case)
    if case == "x2 none":
        run(out, x1=X1[:4])  # the same shape (4, 4, 3, 3), with x2 = another tensor
        kwargs["x2"] = None
    else:
        run(out)
    with pytest.raises(ValueError, match=f"another problem \\(.*{match}.*differ"):
        run(out, **kwargs)


@pytest.mark.parametrize("suffix", [".npy", ".zarr"])
def test_wrong_shape_or_dtype_is_refused(tmp_path, suffix):
    out = str(tmp_path / f"kernel{suffix}")
    run(out)
    with pytest.raises(ValueError, match="shape|another problem"):
        run(out, x1=X1[:5])
    model = Net()
    with pytest.raises(ValueError, match="dtype|another problem"):
        torchntk.ntk(model, X1.float(), X2.float(), implementation="jacobian_contraction", out=out, chunk_size=2)


def test_foreign_npy_truncated_npy_and_unknown_suffix(tmp_path):
    other = tmp_path / "other.npy"
    np.save(other, np.zeros((6, 4, 3), dtype=np.float64))
    with pytest.raises(FileExistsError, match="not written by torchntk"):
        run(str(other))
    os.makedirs(f"{other}{JOURNAL_SUFFIX}")  # a journal without a header, beside a file of another shape
    with pytest.raises(ValueError, match=r"holds an array of shape \(6, 4, 3\)"):
        run(str(other))
    out = tmp_path / "kernel.npy"
    run(str(out))
    with open(out, "r+b") as file:
        file.truncate(os.path.getsize(out) - 8)
    with pytest.raises(ValueError, match="truncated"):
        run(str(out))
    out.write_bytes(b"not a npy file at all")
    with pytest.raises(ValueError, match="not a readable .npy"):
        run(str(out))
    with pytest.raises(ValueError, match="ending in .npy or .zarr"):
        run(str(tmp_path / "kernel.bin"))


def test_a_users_npy_of_the_right_shape_is_not_overwritten(tmp_path):
    """np.save overwrites; an out= path that torchntk did not create is someone's data (stop 29)."""
    path = tmp_path / "mine.npy"
    mine = np.full(tuple(oracle().shape), 7.0)
    np.save(path, mine)
    with pytest.raises(FileExistsError, match="not written by torchntk.*mmap_mode='r\\+'"):
        run(str(path))
    assert np.array_equal(np.load(path), mine)
    assert not os.path.exists(f"{path}{JOURNAL_SUFFIX}")
    assert_oracle(run(np.load(path, mmap_mode="r+")))  # the fix the message names
    os.makedirs(tmp_path / "folder.npy")
    with pytest.raises(IsADirectoryError, match="is a directory"):
        run(str(tmp_path / "folder.npy"))


def test_resume_under_another_float32_matmul_precision_is_refused(tmp_path, computed):
    """float32 tiles under TF32/bfloat16 products differ from full-precision ones: a resume must not mix them."""
    out = str(tmp_path / "kernel.npy")
    model, x1, x2 = Net(), X1.float(), X2.float()
    first = run(out, model=model, x1=x1, x2=x2).clone()
    saved = precision.snapshot()  # torch's settings exactly as they were, new API and legacy flags
    try:
        torch.set_float32_matmul_precision("medium")
        with pytest.raises(ValueError, match="float32 products differ"):
            run(out, model=model, x1=x1, x2=x2)
    finally:
        precision.restore(saved)
    computed["tiles"] = 0
    assert torch.equal(run(out, model=model, x1=x1, x2=x2), first) and computed["tiles"] == 0
    # under "high" torch's own convolution settings stand: cuDNN's TF32 flipped between two runs is refused too
    try:
        torch.set_float32_matmul_precision("high")
        torch.backends.cudnn.allow_tf32 = False
        high = str(tmp_path / "high.npy")
        run(high, model=model, x1=x1, x2=x2)
        torch.backends.cudnn.allow_tf32 = True
        with pytest.raises(ValueError, match="float32 products differ"):
            run(high, model=model, x1=x1, x2=x2)
    finally:
        precision.restore(saved)


def test_a_read_only_journal_is_refused_before_any_tile(tmp_path, monkeypatch, computed):
    """Stop 29: only the .npy file's permission was checked; a read-only journal gave a raw PermissionError after a
    tile had been computed (os.access is patched: the tests may run as root, whom permissions do not stop)."""
    out = str(tmp_path / "kernel.npy")
    run(out, chunk_size=2)
    os.remove(os.path.join(f"{out}{JOURNAL_SUFFIX}", "tiles", "0-2"))
    journal = f"{out}{JOURNAL_SUFFIX}"
    real = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: real(path, mode) and not str(path).startswith(journal))
    computed["tiles"] = 0
    with pytest.raises(PermissionError, match="tile journal .* is read-only"):
        run(out, chunk_size=2)
    assert computed["tiles"] == 0


def test_a_store_whose_header_was_deleted_trusts_none_of_its_tiles(tmp_path, computed):
    """A new header was written beside the old tile records, whose checksums still matched the file: another
    model's tiles were served (0.34 off, stop 29)."""
    out = str(tmp_path / "kernel.npy")
    run(out)
    os.remove(os.path.join(f"{out}{JOURNAL_SUFFIX}", "store.json"))
    other = Net().double()
    with torch.no_grad():
        other.lin1.weight.mul_(2.0)
    computed["tiles"] = 0
    got = run(out, model=other)
    torch.testing.assert_close(torch.as_tensor(np.asarray(got)), oracle(model=other), rtol=1e-12, atol=1e-14)
    assert computed["tiles"] == 6  # all of them, again


def test_read_only_npy(tmp_path, monkeypatch, computed):
    out = str(tmp_path / "kernel.npy")
    run(out)
    store = importlib.import_module("torchntk._npy_store")
    real = os.access
    monkeypatch.setattr(store.os, "access", lambda p, mode: False if mode == os.W_OK else real(p, mode))
    assert_oracle(run(out))  # finished: readable without writing
    data = np.load(out, mmap_mode="r+")
    data[0:2, 0:2] = 0.0
    data.flush()
    with pytest.raises(PermissionError, match="read-only and tiles of the kernel are missing"):
        run(out)
    assert computed["tiles"] == 6  # refused before any work


def test_store_tile_size_is_adopted_or_refused(tmp_path, computed):
    out = str(tmp_path / "kernel.npy")
    total = Net().double()
    one_pair = 3 * 3 * sum(p.numel() for p in total.parameters()) * 8
    run(out, chunk_size=2)
    assert_oracle(run(out, chunk_size=None, max_memory=100 * one_pair))  # a larger budget: the store's tiles
    assert computed["tiles"] == 6
    with pytest.raises(ValueError, match="tiles of 2 examples.*chunk_size=2"):
        run(out, chunk_size=3)


@pytest.mark.parametrize("suffix", [".npy", ".zarr"])
def test_concurrent_writers_of_one_tile(tmp_path, suffix):
    out = str(tmp_path / f"kernel{suffix}")
    stores = [store_of(out) for _ in range(8)]  # eight writers, each its own handle, race on tile (0:2, 0:2)
    barrier = threading.Barrier(8, timeout=60)
    errors = []

    def writer(value: float) -> None:
        try:
            store = stores[int(value) - 1]
            barrier.wait()
            store.write(slice(0, 2), slice(0, 2), torch.full((2, 2, 3, 3), value, dtype=torch.float64))
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=writer, args=(float(v),)) for v in range(1, 9)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors
    store = store_of(out)
    tile = store.read((slice(0, 2), slice(0, 2)))
    assert np.unique(tile).size == 1 and tile[0, 0, 0, 0] in range(1, 9)  # one writer's values, whole
    if suffix == ".npy":  # under the tile's lock the first writer wins and the others find the tile done
        assert store.is_done(slice(0, 2), slice(0, 2))


# ----------------------------------------------------------------------------------------------------------------
# A process killed mid-run (SIGKILL), then the same call again.

SCRIPT = """
import sys, time, importlib
import torch
sys.path[:0] = [{tests!r}]
from test_store import Net, X1, X2
import torchntk
jc = importlib.import_module("torchntk.torch_native.jacobian_contraction")
real = jc.contract_jacobians
def slow(*args):
    time.sleep(0.25)
    return real(*args)
jc.contract_jacobians = slow
torchntk.ntk(Net().double(), X1, X2, implementation="jacobian_contraction", chunk_size=1, out={out!r})
print("finished")
"""


@pytest.mark.parametrize("suffix", [".npy", ".zarr"])
def test_killed_run_resumes_with_only_the_missing_tiles(tmp_path, computed, suffix):
    out = str(tmp_path / f"kernel{suffix}")
    script = SCRIPT.format(tests=str(TESTS), out=out)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(TESTS)])}
    process = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    rows = [slice(i, i + 1) for i in range(6)]
    cols = [slice(j, j + 1) for j in range(4)]
    deadline = time.time() + 120
    done = 0
    while done < 6 and time.time() < deadline and process.poll() is None:
        time.sleep(0.2)
        try:
            store = store_of(out, chunk=1)
        except (ValueError, OSError, KeyError):
            continue  # not created yet
        done = sum(store.is_done(r, c) for r in rows for c in cols)
    process.send_signal(signal.SIGKILL)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == -signal.SIGKILL, stderr.decode()[-2000:]
    store = store_of(out, chunk=1)
    done = sum(store.is_done(r, c) for r in rows for c in cols)
    assert 6 <= done < 24
    kernel = run(out, chunk_size=1)
    assert computed["tiles"] == 24 - done
    assert_oracle(kernel)


@pytest.mark.parametrize("suffix", [".npy", pytest.param(".zarr", marks=pytest.mark.slow)])
def test_two_processes_fill_one_store(tmp_path, suffix):
    """Two writers of one new store at once (its creation raced too): both finish, the kernel is the oracle's."""
    out = str(tmp_path / f"kernel{suffix}")
    script = SCRIPT.format(tests=str(TESTS), out=out)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(TESTS)])}
    processes = [
        subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for _ in range(2)
    ]
    for process in processes:
        stdout, stderr = process.communicate(timeout=300)
        assert process.returncode == 0 and b"finished" in stdout, stderr.decode()[-2000:]
    store = store_of(out, chunk=1)
    assert all(store.is_done(slice(i, i + 1), slice(j, j + 1)) for i in range(6) for j in range(4))
    assert_oracle(store.result())


class Settings:
    """An object the architecture fingerprint cannot see into: its value lives in a builtin container's storage."""

    def __init__(self, gain: float) -> None:
        self.cell = array.array("d", [gain])

    @property
    def gain(self) -> float:
        return self.cell[0]


class OpaqueNet(Net):
    def __init__(self, gain: float) -> None:
        super().__init__()
        self.settings = Settings(gain)

    def forward(self, x):
        return super().forward(x) * self.settings.gain


def test_uncertain_fingerprint_trusts_no_finished_tile(tmp_path, computed):
    """Two models the fingerprint cannot tell apart: a finished tile of one is never served as the other's. (Before,
    one tile was recomputed and compared; models that differ on other examples only passed that.)"""
    out = str(tmp_path / "kernel.npy")
    two, three = OpaqueNet(2.0).double(), OpaqueNet(3.0).double()
    assert_oracle(run(out, model=two), model=two)
    with pytest.raises(ValueError, match="or may: .*cannot see.*settings"):
        run(out, model=two)  # the same model, which nothing can tell from another
    with pytest.raises(ValueError, match="another problem .*the model's outputs or gradients on these examples"):
        run(out, model=three)  # another: its outputs differ
    path = tmp_path / "memmap.npy"
    run(np.lib.format.open_memmap(path, "w+", np.float64, (6, 4, 3, 3)), model=two)
    computed["tiles"] = 0
    assert_oracle(run(np.load(path, mmap_mode="r+"), model=three), model=three)  # journal forgotten, recomputed
    assert computed["tiles"] == 6


# ----------------------------------------------------------------------------------------------------------------
# Many writers opening one new store at the same moment (ranks starting together): all get the same store.


@pytest.mark.parametrize("suffix", [".npy", ".zarr"])
def test_writers_opening_one_new_store_at_once(tmp_path, suffix):
    problem = prepare(Net().double(), X1, X2, params=None, trace_axes=(), diagonal_axes=())
    for trial in range(8):  # the race is won differently each time
        out = str(tmp_path / f"kernel{trial}{suffix}")
        barrier = threading.Barrier(8, timeout=60)
        errors, stores = [], []

        def opener(out: str, barrier: threading.Barrier, stores: list, errors: list) -> None:
            try:
                barrier.wait()
                stores.append(open_store(out, problem, 2, "jacobian_contraction"))
            except Exception as error:  # noqa: BLE001 - reported below
                errors.append(error)

        threads = [threading.Thread(target=opener, args=(out, barrier, stores, errors)) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        assert not errors, errors[0]
        assert len(stores) == 8 and {store.chunk for store in stores} == {2}


def test_concurrent_probes_do_not_see_each_other_as_randomness():
    errors = []
    barrier = threading.Barrier(6, timeout=60)
    models = [Net().double() for _ in range(6)]  # built here: a thread drawing init weights would be randomness

    def prober(model: nn.Module) -> None:
        try:
            barrier.wait()
            for _ in range(3):
                prepare(model, X1, X2, params=None, trace_axes=(), diagonal_axes=())
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=prober, args=(model,)) for model in models]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors[0]


def test_a_store_has_the_permissions_open_would_give(tmp_path):
    """mkstemp's 0600 made kernels unreadable to other users (and ranks under another account)."""
    import stat

    out = str(tmp_path / "kernel.npy")
    run(out)
    umask = os.umask(0)
    os.umask(umask)
    for path in [out, *(str(p) for p in Path(out + JOURNAL_SUFFIX).rglob("*") if p.is_file())]:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~umask, path


def test_an_out_sharing_memory_with_inputs_or_weights_is_refused():
    """Tiles are written while later tiles read the inputs and weights: an out= that was x1 (or a weight, or a
    numpy view of x1) gave kernels 0.2-1.7 off and wrote into the weights."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1)).double()
    x = torch.randn(4, 4, dtype=torch.float64)
    weights = {name: p.detach().clone() for name, p in model.named_parameters()}
    kwargs = {"trace_axes": (-1,), "chunk_size": 1, "implementation": "jacobian_contraction"}
    for out, what in ((x, "x1"), (model[0].weight.data, "parameter '0.weight'"), (x.numpy(), "x1")):
        with pytest.raises(ValueError, match=f"out= shares memory with {re.escape(what)}"):
            torchntk.ntk(model, x, out=out, **kwargs)
    with pytest.raises(ValueError, match="out= requires grad"):
        torchntk.ntk(model, x, out=model[0].weight, **kwargs)
    with pytest.raises(ValueError, match="out= has elements that share memory"):
        torchntk.ntk(model, x, out=torch.zeros(1, dtype=torch.float64).expand(4, 4), **kwargs)
    assert all(torch.equal(p, weights[name]) for name, p in model.named_parameters())


def test_a_change_the_fingerprint_cannot_see_is_caught_by_the_outputs(tmp_path, monkeypatch):
    """A store's header holds projections of the model's outputs on its examples: a model changed where the
    fingerprint cannot see (a helper module's constant read through getattr or importlib) had its old tiles served
    on resume (0.89 off)."""
    import _fingerprint_helpers as helpers

    class ByGetattr(Net):
        def forward(self, x):  # the helper module by its name at run time: nothing the fingerprint reads
            return super().forward(x) * importlib.import_module("_fingerprint_helpers").SCALE

    model = ByGetattr().double()
    for suffix in (".npy", ".zarr"):
        out = str(tmp_path / f"kernel{suffix}")
        monkeypatch.setattr(helpers, "SCALE", 1.0)
        assert_oracle(run(out, model=model), model=model)
        monkeypatch.setattr(helpers, "SCALE", 3.0)
        with pytest.raises(ValueError, match="the model's outputs or gradients on these examples"):
            run(out, model=model)


GRADIENT_SCALE = types.ModuleType("gradient_scale")  # a helper module read through getattr: the fingerprint's blind
GRADIENT_SCALE.value, GRADIENT_SCALE.above = 1.0, -1e9  # spot (a user module's constant read by a computed name)


class StraightThroughScaled(Net):
    """Outputs as Net's; the gradient through the hidden layer scaled (LSQ's trick, ``(h - h·s).detach() + h·s``), on
    the examples whose first input is above ``GRADIENT_SCALE.above`` only."""

    def forward(self, x):
        h = self.act(self.lin1(x))
        s = torch.where(x[:, :1] > GRADIENT_SCALE.above, getattr(GRADIENT_SCALE, "value"), 1.0)  # noqa: B009
        return self.lin2((h - h * s).detach() + h * s) * self.scale


@pytest.mark.parametrize(
    "case, dtype, change",
    [
        ("complete", torch.float64, 3.0),
        ("interrupted", torch.float64, 3.0),
        ("later_examples", torch.float64, 3.0),
        ("float32_small", torch.float32, 1.0 + 1e-4),
    ],
)
def test_a_change_of_the_gradient_alone_is_refused_on_resume(tmp_path, monkeypatch, case, dtype, change):
    """Found by hostile probing: a complete store was served after the scale moved 1 → 3 (0.71 off), an interrupted
    one mixed both models' tiles (0.63 off); with projections of the first four examples, a change on later examples
    only passed (0.44), and a float32 change of 1e-4 passed a loose bound (3.3e-5 off, 8e-8 fresh). The header's
    projections of the Jacobian, over every example, tell."""
    out = str(tmp_path / "kernel.npy")
    x1, x2 = X1.clone(), X2.clone()
    monkeypatch.setattr(GRADIENT_SCALE, "value", 1.0)
    monkeypatch.setattr(GRADIENT_SCALE, "above", -1e9)
    if case == "later_examples":  # the scale acts on x1's examples after the fourth only (of six), on none of x2's
        x1[:, 0], x2[:, 0] = x1[:, 0].clamp(-1, 1), x2[:, 0].clamp(-1, 1)
        x1[4:, 0] = 3.0
        monkeypatch.setattr(GRADIENT_SCALE, "above", 2.0)
    want_x1, want_x2 = x1, x2
    x1, x2 = x1.to(dtype), x2.to(dtype)
    model = StraightThroughScaled().to(dtype)
    if case == "interrupted":  # one tile of the old model written
        store_of(out, model=model, x1=x1, x2=x2).write(
            slice(0, 2), slice(0, 2), oracle(model=model, x1=x1, x2=x2)[:2, :2]
        )
    else:
        run(out, model=model, x1=x1, x2=x2)
    monkeypatch.setattr(GRADIENT_SCALE, "value", change)
    with pytest.raises(ValueError, match="another problem .*outputs or gradients"):
        run(out, model=model, x1=x1, x2=x2)
    fresh = run(str(tmp_path / "fresh.npy"), model=model, x1=x1, x2=x2)  # the new model's kernel, afresh
    want = oracle(model=model.double(), x1=want_x1, x2=want_x2)
    assert torch.allclose(
        torch.as_tensor(np.asarray(fresh)).double(), want, rtol=1e-5 if dtype == torch.float32 else 1e-12, atol=1e-6
    )


def test_structured_derivatives_resume_a_store_in_its_own_tiles(tmp_path, private_cache):
    """Found by hostile probing: structured derivatives' tile, fitted to memory, counted as the caller's chunk_size,
    so a store written in tiles of 2 was refused unless chunk_size=2 was passed again (the other methods adopt it)."""
    out = str(tmp_path / "kernel.npy")
    model = Net().double()
    store_of(out, model=model).write(slice(0, 2), slice(0, 2), oracle(model=model)[0:2, 0:2])  # one tile of six
    kernel = torchntk.ntk(model, X1, X2, implementation="structured_derivatives", out=out)
    assert_oracle(kernel, model=model)
    with pytest.raises(ValueError, match="was written in tiles of 2 examples, this call uses 3"):
        torchntk.ntk(model, X1, X2, implementation="structured_derivatives", out=out, chunk_size=3)
