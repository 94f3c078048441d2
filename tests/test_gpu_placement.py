"""GPU placement, sharing and out-of-memory logic of ``torchntk.bridge.device``, on the CPU with the devices faked.

The same paths on a real GPU are in ``test_gpu_cuda.py`` (skipped without one).
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import warnings
from types import SimpleNamespace

import jax
import numpy as np
import pytest
import torch
from _oracle import oracle_ntk
from _zoo import make

import torchntk
from torchntk import _auto
from torchntk._problem import prepare
from torchntk.bridge import device as placement
from torchntk.bridge import torch_glue


def _gpu(hardware_id: int, bus_id: str | None = None, device_id: int | None = None) -> SimpleNamespace:
    """A stand-in for a JAX GPU device: its CUDA ordinal, JAX id and (optionally) PCI bus id."""
    fake = SimpleNamespace(
        platform="gpu", local_hardware_id=hardware_id, id=hardware_id if device_id is None else device_id
    )
    if bus_id is not None:
        fake.pci_bus_id = bus_id
    return fake


@pytest.fixture(autouse=True)
def fresh_warnings(monkeypatch):
    monkeypatch.setattr(placement, "_WARNED", set())


def test_bus_ids_normalized_from_every_spelling():
    assert placement.normalize_bus_id("0000:3B:00.0") == "0000:3b:00"
    assert placement.normalize_bus_id("00000000:3b:00.0") == "0000:3b:00"
    assert placement.normalize_bus_id("3b:00") == "0000:3b:00"
    assert placement.normalize_bus_id("0001:c1:1f.7") == "0001:c1:1f"
    assert placement.normalize_bus_id("GPU-1234") is None


def test_match_by_ordinal_when_no_bus_ids():
    gpus = [_gpu(1, device_id=0), _gpu(0, device_id=1)]  # JAX ids need not be CUDA ordinals
    assert placement.match_gpu(1, "0000:3b:00", gpus) is gpus[0]
    assert placement.match_gpu(0, None, gpus) is gpus[1]
    assert placement.match_gpu(2, None, gpus) is None


def test_match_by_bus_id_wins_over_ordinal():
    gpus = [_gpu(0, "0000:3B:00.0"), _gpu(1, "0000:86:00.0")]
    assert placement.match_gpu(0, "0000:86:00", gpus) is gpus[1]  # the ordinal would say gpus[0]
    assert placement.match_gpu(1, "0000:3b:00", gpus) is gpus[0]
    # JAX reports bus ids and none is the model's: the ordinal is not trusted either
    assert placement.match_gpu(0, "0000:aa:00", gpus) is None


def test_model_on_cuda_1_runs_on_that_gpu(monkeypatch):
    gpus = [_gpu(0, "0000:3b:00.0"), _gpu(1, "0000:86:00.0")]
    monkeypatch.setattr(placement, "jax_gpu_devices", lambda: gpus)
    monkeypatch.setattr(placement, "torch_bus_id", lambda index: ["0000:3b:00", "0000:86:00"][index])
    assert placement.jax_device_for(torch.device("cuda", 1)) is gpus[1]
    assert placement.jax_device_for(torch.device("cuda", 0)) is gpus[0]
    assert placement.jax_platform_for(torch.device("cuda", 1)) == "gpu"
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)  # "cuda" without an index: torch's current GPU
    assert placement.jax_device_for(torch.device("cuda")) is gpus[1]


def test_no_gpu_backend_warns_once_naming_the_extra_and_uses_the_cpu(monkeypatch):
    monkeypatch.setattr(placement, "jax_gpu_devices", lambda: [])
    with pytest.warns(RuntimeWarning, match=r"torchntk\[cuda\]") as record:
        first = placement.jax_device_for(torch.device("cuda", 0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second call says nothing
        second = placement.jax_device_for(torch.device("cuda", 0))
    assert len(record) == 1
    assert first is second is jax.devices("cpu")[0]
    assert placement.jax_platform_for(torch.device("cuda", 0)) == "cpu"


def test_gpu_jax_does_not_see_warns_and_uses_the_cpu(monkeypatch):
    monkeypatch.setattr(placement, "jax_gpu_devices", lambda: [_gpu(0)])
    monkeypatch.setattr(placement, "torch_bus_id", lambda index: None)
    with pytest.warns(RuntimeWarning, match="not the model's cuda:3"):
        assert placement.jax_device_for(torch.device("cuda", 3)).platform == "cpu"


def test_cpu_model_never_asks_for_a_gpu(monkeypatch):
    monkeypatch.setattr(placement, "jax_gpu_devices", lambda: pytest.fail("looked for a GPU for a CPU model"))
    assert placement.jax_device_for(torch.device("cpu")).platform == "cpu"


def test_float64_on_the_gpu_path(monkeypatch):
    """A float64 model on a GPU computes there under x64, without rounding to float32 on the way in or out.

    The 'GPU' is JAX's CPU device posing as CUDA ordinal 0, so the GPU branch runs end to end here.
    """
    stand_in = jax.devices("cpu")[0]
    assert stand_in.local_hardware_id == 0
    monkeypatch.setattr(placement, "jax_gpu_devices", lambda: [stand_in])
    monkeypatch.setattr(placement, "torch_bus_id", lambda index: None)
    problem = SimpleNamespace(device=torch.device("cuda", 0), out_dtype=torch.float64, params={})
    tensor = torch.randn(3, 2, dtype=torch.float64)
    with placement.jax_scope(problem) as target:
        assert target is stand_in
        assert jax.config.jax_enable_x64
        array = placement.to_jax_array(tensor, target)
        assert array.dtype == jax.numpy.float64
        assert array.unsafe_buffer_pointer() == tensor.data_ptr()  # DLPack, no copy
        back = placement.to_torch(array * 1.0 + 0.0, torch.device("cpu"))
    assert back.dtype == torch.float64
    assert torch.equal(back, tensor)
    assert not jax.config.jax_enable_x64


def test_dlpack_both_ways_shares_memory():
    tensor = torch.randn(4, 5)
    array = placement.to_jax_array(tensor, jax.devices("cpu")[0])
    assert array.unsafe_buffer_pointer() == tensor.data_ptr()
    assert placement.to_torch(array, torch.device("cpu")).data_ptr() == tensor.data_ptr()


def test_lent_tensors_come_back_before_a_call_returns(monkeypatch):
    """XLA releases a computation's torch inputs on its worker thread; a release left for interpreter shutdown
    aborted the process. Every tensor lent by DLPack is back from JAX when ``torchntk.ntk`` returns."""
    outcomes = []
    real_wait = placement.wait_until_returned

    def recording_wait(timeout: float = 2.0) -> bool:
        outcomes.append(real_wait(timeout))
        return outcomes[-1]

    monkeypatch.setattr(placement, "wait_until_returned", recording_wait)
    model, x1, x2 = make("mlp", n1=3, n2=2)
    for kwargs in ({}, {"chunk_size": 1}, {"x2": None}):  # one fused tile; tiles from ingredients; symmetric
        inputs2 = kwargs.pop("x2", x2)
        kernel = torchntk.ntk(model, x1, inputs2, implementation="structured_derivatives", **kwargs)
        expected = oracle_ntk(model, x1, inputs2)
        assert ((kernel - expected).abs().max() / expected.abs().max()).item() < 1e-10
    assert outcomes == [True, True, True] and placement.lent_tensors() == []


def test_a_failed_call_forgets_its_lent_tensors(monkeypatch):
    """No tensor stays referenced (its storage alive) after a structured call raised."""

    def failing(*args, **kwargs):
        raise RuntimeError("injected")

    monkeypatch.setattr(torch_glue, "compiled_ntk_fn", failing)
    model, x1, x2 = make("mlp", n1=3, n2=2)
    with pytest.raises(RuntimeError, match="injected"):
        torchntk.ntk(model, x1, x2, implementation="structured_derivatives")
    assert placement.lent_tensors() == []


def test_a_call_waits_for_its_own_thread_only():
    """A tensor another thread lent (and whose array is alive) does not hold up this thread's wait."""
    import threading

    kept = {}
    other = threading.Thread(target=lambda: kept.setdefault("array", placement.to_jax_array(torch.randn(8), "cpu")))
    other.start()
    other.join()
    assert placement.wait_until_returned(timeout=30.0) and placement.lent_tensors() == []
    assert "array" in kept


def test_wait_until_returned_sees_jax_holding_a_tensor():
    tensor = torch.randn(64, 64)
    array = placement.to_jax_array(tensor, "cpu")
    result = jax.jit(lambda a: (a @ a).sum())(array)
    assert not placement.wait_until_returned(timeout=0.05)  # the array is alive: JAX holds the tensor
    array = placement.to_jax_array(tensor, "cpu")
    result = jax.jit(lambda a: (a @ a).sum())(array)
    del array
    result.block_until_ready()
    assert placement.wait_until_returned(timeout=5.0) and placement.lent_tensors() == []


# ------------------------------------------------------------------------------------------ out of memory


def _fake_oom() -> Exception:
    return jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 123456 bytes.")


def _oom_above(monkeypatch, max_pairs: int) -> list[tuple[int, int]]:
    """Make every SD tile with more than ``max_pairs`` example pairs run out of memory; returns the tiles tried
    (a tile of a longer call is contracted from both chunks' cached ingredients, the only tile of a call and the
    halves of a tile by the whole structured program)."""
    tried: list[tuple[int, int]] = []
    compiled, contraction = torch_glue.compiled_ntk_fn, torch_glue.compiled_contraction

    def guard(problem, n1: int, n2: int) -> None:
        tried.append((n1, n2))
        if (n1 if problem.paired else n1 * n2) > max_pairs:
            raise _fake_oom()

    def fake_compiled(problem, converted, args, rows=None):
        run = compiled(problem, converted, args, rows)

        def guarded(inputs1, inputs2, params):  # inputs2=None: the chunk with itself (x2=None diagonal)
            guard(problem, inputs1[0].shape[0], (inputs2 or inputs1)[0].shape[0])
            return run(inputs1, inputs2, params)

        return guarded

    def fake_contraction(problem, converted, side1, side2):
        run = contraction(problem, converted, side1, side2)

        def guarded(ingredients1, ingredients2):  # ingredients2=None: the chunk with itself (x2=None diagonal)
            guard(problem, ingredients1.count, (ingredients2 or ingredients1).count)
            return run(ingredients1, ingredients2)

        return guarded

    monkeypatch.setattr(torch_glue, "compiled_ntk_fn", fake_compiled)
    monkeypatch.setattr(torch_glue, "compiled_contraction", fake_contraction)
    return tried


@pytest.mark.parametrize(
    "n1, n2, symmetric, diagonal_axes, max_pairs, first_halves",
    [
        (4, 3, False, (), 6, [(2, 3), (2, 3)]),  # x1 has more examples: split it
        (2, 5, False, (), 6, [(2, 3), (2, 2)]),  # x2 has more: split it
        (5, 5, True, (), 15, [(3, 5), (2, 5)]),  # x2=None: the symmetric diagonal tile
        (4, 4, False, (0,), 2, [(2, 2), (2, 2)]),  # per-example kernels: both sides together
    ],
)
def test_a_tile_out_of_memory_is_retried_in_halves_with_the_same_kernel(
    monkeypatch, n1, n2, symmetric, diagonal_axes, max_pairs, first_halves
):
    model, x1, x2 = make("mlp", n1=n1, n2=n2)
    x2 = None if symmetric else x2
    expected = oracle_ntk(model, x1, x2, diagonal_axes=diagonal_axes)
    tried = _oom_above(monkeypatch, max_pairs)
    kernel = torchntk.ntk(
        model, x1, x2, implementation="structured_derivatives", diagonal_axes=diagonal_axes, chunk_size=5
    )
    assert tried[0] == (n1, n1 if symmetric else n2)  # the whole tile first, then its halves
    assert tried[1:] == first_halves
    scale = expected.abs().max()
    assert ((kernel - expected).abs().max() / scale).item() < 1e-10


def test_a_half_out_of_memory_too_raises_naming_max_memory(monkeypatch):
    model, x1, x2 = make("mlp", n1=4, n2=4)
    _oom_above(monkeypatch, 1)
    with pytest.raises(torch.OutOfMemoryError, match="max_memory") as caught:
        torchntk.ntk(model, x1, x2, implementation="structured_derivatives", max_memory=10**9)
    assert "again for half" in str(caught.value) and "1,000,000,000 bytes" in str(caught.value)


def test_one_pair_out_of_memory_raises_at_once():
    calls = []

    def compute(a, b):
        calls.append(1)
        raise _fake_oom()

    with pytest.raises(torch.OutOfMemoryError, match="smallest tile"):
        placement.retry_smaller_on_oom(
            compute, (torch.zeros(1, 2),), (torch.zeros(1, 2),), False, device=torch.device("cpu"), max_memory=None
        )
    assert len(calls) == 1


def test_other_errors_are_not_retried():
    calls = []

    def compute(a, b):
        calls.append(1)
        raise ValueError("a bug, not memory")

    with pytest.raises(ValueError, match="a bug"):
        placement.retry_smaller_on_oom(
            compute, (torch.zeros(4, 2),), (torch.zeros(4, 2),), False, device=torch.device("cpu"), max_memory=None
        )
    assert len(calls) == 1
    assert placement.is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory"))
    assert not placement.is_out_of_memory(RuntimeError("RESOURCE_EXHAUSTED"))  # not from XLA


# ------------------------------------------------------------------------------------------ sharing one GPU


class _FakeCuda:
    """torch.cuda's memory queries for one fake GPU: ``free`` bytes, ``reserved`` of which ``allocated`` in use."""

    def __init__(self, monkeypatch, free: int, reserved: int, allocated: int) -> None:
        self.free, self.reserved, self.allocated, self.emptied = free, reserved, allocated, 0
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (self.free, 10 * self.free))
        monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: self.reserved)
        monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: self.allocated)
        monkeypatch.setattr(torch.cuda, "empty_cache", self.empty_cache)
        monkeypatch.setattr(torch.cuda, "device", lambda device: _NullContext())
        monkeypatch.setattr(placement, "memory_budget", lambda problem, m: m if m is not None else self.free // 2)
        monkeypatch.setattr(placement, "tile_bytes", lambda problem, per_example, chunk: chunk * per_example)

    def empty_cache(self) -> None:
        self.emptied += 1
        self.free += self.reserved - self.allocated
        self.reserved = self.allocated


class _NullContext:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def _cuda_problem(n: int = 100) -> SimpleNamespace:
    return SimpleNamespace(device=torch.device("cuda", 0), n1=n, n2=n)


def test_torch_cache_released_when_the_call_would_not_fit(monkeypatch):
    cuda = _FakeCuda(monkeypatch, free=1000, reserved=5000, allocated=1000)
    options = torchntk._tiles.TileOptions()
    assert placement.make_room(_cuda_problem(), options, bytes_per_example=20)  # wants 2000 > 500 budget
    assert cuda.emptied == 1 and cuda.free == 5000
    assert not placement.make_room(_cuda_problem(), options, bytes_per_example=20)  # now it fits: nothing to do


def test_torch_cache_kept_when_there_is_room_or_nothing_to_release(monkeypatch):
    cuda = _FakeCuda(monkeypatch, free=10_000, reserved=5000, allocated=1000)
    options = torchntk._tiles.TileOptions()
    assert not placement.make_room(_cuda_problem(), options, bytes_per_example=20)  # 2000 <= 5000 budget
    cuda.free, cuda.reserved = 100, 1000  # short, but torch's cache is all in use
    assert not placement.make_room(_cuda_problem(), options, bytes_per_example=20)
    assert cuda.emptied == 0
    # max_memory: the room asked for is max_memory itself; chunk_size: the caller sized the tiles
    cuda.reserved = 3000
    assert not placement.make_room(_cuda_problem(), torchntk._tiles.TileOptions(chunk_size=4), 20)
    assert placement.make_room(_cuda_problem(), torchntk._tiles.TileOptions(max_memory=1500), 20)
    assert cuda.emptied == 1


def test_cpu_model_never_touches_the_cuda_cache(monkeypatch):
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: pytest.fail("emptied torch's CUDA cache for a CPU model"))
    problem = SimpleNamespace(device=torch.device("cpu"), n1=4, n2=4)
    assert not placement.make_room(problem, torchntk._tiles.TileOptions(), 10**12)


PREALLOCATE = "import os, torchntk; print(os.environ.get('XLA_PYTHON_CLIENT_PREALLOCATE'))"


@pytest.mark.parametrize(
    "user_env, expected",
    [
        ({}, "false"),
        ({"XLA_PYTHON_CLIENT_PREALLOCATE": "true"}, "true"),
        ({"XLA_PYTHON_CLIENT_MEM_FRACTION": ".3"}, "None"),
    ],
)
def test_xla_preallocation_off_unless_the_user_chose(user_env, expected):
    env = {k: v for k, v in os.environ.items() if not k.startswith("XLA_PYTHON_CLIENT_")}
    done = subprocess.run(
        [sys.executable, "-c", PREALLOCATE], env={**env, **user_env}, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == expected


# ------------------------------------------------------------------------------------------ auto on a GPU


def test_auto_on_an_unfitted_device_ranks_by_flops_and_bytes(monkeypatch):
    model, x1, x2 = make("mlp", n1=3, n2=2)
    fitted = torchntk.explain(model, x1, x2)
    assert fitted.time_model == "cpu" and "no time model" not in fitted.reason
    monkeypatch.setattr(_auto, "_SECONDS_PER_TERM_BY_DEVICE", {})  # as on CUDA today: no fit for this device kind
    monkeypatch.setattr(_auto, "_CHOICES", {})
    monkeypatch.setattr(_auto, "_NATIVE", {})
    unfitted = torchntk.explain(model, x1, x2)
    assert unfitted.time_model == "flop-byte"
    assert "no time model is fitted for cpu" in unfitted.reason
    problem = prepare(model, x1, x2, params=None, trace_axes=(), diagonal_axes=())
    terms = _auto.native_terms(problem, _auto.forward_flops(problem))["jacobian_contraction"]
    jc = next(e for e in unfitted.estimates if e.implementation == "jacobian_contraction")
    # the multiply-adds and bytes at nominal rates, nothing else
    assert jc.seconds == pytest.approx((terms[2] + terms[3]) / 1e13 + terms[4] / 1e12)


def test_the_cuda_kind_has_no_fit_yet():
    problem = SimpleNamespace(device=torch.device("cuda", 0))
    assert _auto.time_model(problem) == "flop-byte"
    assert _auto.time_model(SimpleNamespace(device=torch.device("cpu"))) == "cpu"
    terms = [1.0, 10.0, 1e13, 2e13, 1e12, 5.0, 1e6, 4.0]  # the last two: check_terms (no cost in flop-byte)
    assert _auto._predict("jacobian_contraction", terms, "flop-byte") == pytest.approx(4.0)
    assert _auto._predict("jacobian_contraction", terms, "cpu") == _auto._predict("jacobian_contraction", terms)


def test_without_the_tf_extra_the_onnx_tf_route_says_so(monkeypatch):
    """GPU images often lack TensorFlow: route "auto" must then go on to onnx-jax, not die on an ImportError."""
    import importlib.util

    from torchntk.converters import api
    from torchntk.converters.errors import ConversionError

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnx2tf" else real(name, *a))
    with pytest.raises(ConversionError, match=r"needs onnx2tf: pip install 'torchntk\[tf\]'"):
        api._load_route("onnx-tf")


PER_DEVICE = """
import jax, torch
from torchntk._problem import prepare
from torchntk.bridge import torch_glue

model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).double().eval()
x = torch.randn(2, 3, dtype=torch.float64)
problem = prepare(model, x, None, params=None, trace_axes=(), diagonal_axes=())
converted = torch_glue.convert(problem)
kernels = []
with jax.enable_x64(True):
    for device in jax.devices("cpu")[:2]:
        inputs = (torch_glue.to_jax_array(x, device),)
        params = {name: torch_glue.to_jax_array(value, device) for name, value in problem.params.items()}
        kernel = torch_glue.compiled_ntk_fn(problem, converted, (inputs, inputs, params))(inputs, inputs, params)
        assert kernel.devices() == {device}, (kernel.devices(), device)
        kernels.append(torch.from_dlpack(kernel))
assert torch.equal(kernels[0], kernels[1])
print("compiled", len(torch_glue._COMPILED))
"""


def test_a_compiled_kernel_function_is_per_device(tmp_path):
    """The same model and shapes on two devices (here two XLA host devices) compile twice: an executable is bound
    to its device and would refuse, or move, the other device's arrays."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "TORCHNTK_CACHE_DIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", PER_DEVICE], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "compiled 2"


def test_channels_last_weights_cross_in_the_default_layout():
    """A channels_last 1×1 conv weight is contiguous to torch with strides (I, 1, I, I); JAX imported it by DLPack
    with another layout, and the structured program compiled for it refused the same architecture's weights in the
    default memory format ("compiled for input layouts that disagree")."""
    weight = torch.randn(8, 4, 1, 1).to(memory_format=torch.channels_last)
    array = placement.to_jax_array(weight, jax.devices("cpu")[0])
    assert array.format.layout.major_to_minor == (0, 1, 2, 3)
    assert np.array_equal(np.asarray(array), weight.numpy())
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(64, 2))
    model = model.double().eval()
    x1, x2 = torch.randn(2, 3, 4, 4, dtype=torch.float64), torch.randn(2, 3, 4, 4, dtype=torch.float64)
    expected = oracle_ntk(model, (x1,), (x2,))
    channels_last = copy.deepcopy(model).to(memory_format=torch.channels_last)
    for m in (channels_last, model):  # one program, both memory formats
        kernel = torchntk.ntk(m, x1, x2, implementation="structured_derivatives")
        assert torch.allclose(kernel, expected, rtol=1e-10, atol=1e-12)
