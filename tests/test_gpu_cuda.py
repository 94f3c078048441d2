"""Every method on a CUDA model, structured derivatives on the model's own GPU (skipped without a CUDA device).

Run by ``benchmarks/gpu_check.sh`` on a GPU machine; the same logic with the devices faked runs everywhere in
``test_gpu_placement.py``. Structured-derivative tests also need JAX's CUDA backend (``pip install
'torchntk[cuda]'``): without it they are skipped here, and gpu_check.sh fails its verdict instead.
"""

from __future__ import annotations

import copy

import pytest
import torch
from _oracle import oracle_ntk
from _zoo import make

import torchntk
from torchntk._precision import reduced_precision_requested
from torchntk.bridge import device as placement
from torchntk.bridge import torch_glue

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
METHODS = ["jacobian_contraction", "ntk_vector_products", "structured_derivatives"]


def _needs_jax_gpu() -> None:
    if not placement.jax_gpu_devices():
        pytest.skip("JAX has no GPU backend here: pip install 'torchntk[cuda]'")


def _on(device: torch.device, model: torch.nn.Module, *inputs: tuple[torch.Tensor, ...]) -> tuple:
    return (model.to(device), *(tuple(x.to(device) for x in side) for side in inputs))


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: float) -> None:
    assert actual.shape == expected.shape
    scale = expected.abs().max().clamp_min(1e-30)
    assert ((actual.cpu() - expected).abs().max() / scale).item() < tol


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", ["mlp", "cnn_bn", "residual"])
@pytest.mark.parametrize("trace_axes, diagonal_axes", [((), ()), ((-1,), ()), ((), (0,))])
def test_each_method_on_cuda_equals_the_cpu_oracle_float64(method, name, trace_axes, diagonal_axes):
    if method == "structured_derivatives":
        _needs_jax_gpu()
    model, x1, x2 = make(name, n1=3, n2=3)
    expected = oracle_ntk(model, x1, x2, trace_axes=trace_axes, diagonal_axes=diagonal_axes)
    expected_symmetric = oracle_ntk(model, x1, None, trace_axes=trace_axes)
    device = torch.device("cuda", 0)
    model, x1, x2 = _on(device, model, x1, x2)
    kernel = torchntk.ntk(model, x1, x2, implementation=method, trace_axes=trace_axes, diagonal_axes=diagonal_axes)
    assert kernel.device == device and kernel.dtype == torch.float64
    _assert_close(kernel, expected, 1e-10)
    symmetric = torchntk.ntk(model, x1, implementation=method, trace_axes=trace_axes, chunk_size=2)
    assert symmetric.device == device
    _assert_close(symmetric, expected_symmetric, 1e-10)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", ["wide_mlp", "cnn_bn"])
def test_float32_kernels_on_cuda_are_float32_accurate(method, name):
    """At torch's default float32 matmul precision no method multiplies or convolves in TF32: not JAX (its default
    on a GPU made structured kernels 0.3–1.3% off on an H200, and the conversion's check refused resnets), not cuDNN
    (its default TF32 made resnet18's kernel by JC and NVP 2.3% off: ``torchntk/_precision.py``)."""
    if method == "structured_derivatives":
        _needs_jax_gpu()
    if name == "wide_mlp":
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(64, 512), torch.nn.Tanh(), torch.nn.Linear(512, 10))
        x1, x2 = (torch.randn(4, 64),), (torch.randn(3, 64),)
    else:
        model, x1, x2 = make(name, dtype=torch.float32, n1=4, n2=3)
    expected = oracle_ntk(copy.deepcopy(model).double(), *(tuple(x.double() for x in side) for side in (x1, x2)))
    assert not reduced_precision_requested()  # torch's defaults: products in float32, cuDNN's convolutions in TF32
    model, x1, x2 = _on(torch.device("cuda", 0), model.float(), x1, x2)
    kernel = torchntk.ntk(model, x1, x2, implementation=method)
    assert kernel.dtype == torch.float32
    _assert_close(kernel.double(), expected, 2e-5)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
@pytest.mark.parametrize("method", METHODS)
def test_a_model_on_cuda_1_computes_and_returns_on_cuda_1(method, monkeypatch):
    if method == "structured_derivatives":
        _needs_jax_gpu()
    model, x1, x2 = make("mlp", n1=3, n2=2)
    expected = oracle_ntk(model, x1, x2)
    device = torch.device("cuda", 1)
    model, x1, x2 = _on(device, model, x1, x2)
    seen = []
    real = torch_glue.to_jax_array
    monkeypatch.setattr(torch_glue, "to_jax_array", lambda t, target: seen.append(real(t, target)) or seen[-1])
    kernel = torchntk.ntk(model, x1, x2, implementation=method)
    assert kernel.device == device
    _assert_close(kernel, expected, 1e-10)
    for array in seen:  # every array SD used is on the JAX device that is cuda:1
        (jax_device,) = array.devices()
        assert jax_device.platform == "gpu" and jax_device.local_hardware_id == 1


def test_structured_derivatives_cross_by_dlpack_without_a_host_copy(monkeypatch):
    _needs_jax_gpu()
    model, x1, x2 = make("cnn_bn", n1=3, n2=2)
    model, x1, x2 = _on(torch.device("cuda", 0), model, x1, x2)
    into_jax, into_torch = [], []
    real_in, real_out = torch_glue.to_jax_array, torch_glue.to_torch

    def recording_in(tensor, target):
        array = real_in(tensor, target)
        into_jax.append((tensor.data_ptr(), array.unsafe_buffer_pointer(), array.devices()))
        return array

    def recording_out(array, device):
        tensor = real_out(array, device)
        into_torch.append((array.unsafe_buffer_pointer(), tensor.data_ptr()))
        return tensor

    monkeypatch.setattr(torch_glue, "to_jax_array", recording_in)
    monkeypatch.setattr(torch_glue, "to_torch", recording_out)
    torchntk.ntk(model, x1, x2, implementation="structured_derivatives")
    assert len(into_jax) > len(x1) + len(x2) and into_torch
    for torch_pointer, jax_pointer, devices in into_jax:  # parameters and the (whole-batch) inputs
        assert jax_pointer == torch_pointer
        assert {d.platform for d in devices} == {"gpu"}
    for jax_pointer, torch_pointer in into_torch:  # the kernel tile
        assert torch_pointer == jax_pointer


def test_two_structured_calls_do_not_grow_torch_reserved_memory():
    _needs_jax_gpu()
    model, x1, x2 = make("residual", dtype=torch.float32, n1=16, n2=16)
    model, x1, x2 = _on(torch.device("cuda", 0), model, x1, x2)
    torchntk.ntk(model, x1, x2, implementation="structured_derivatives")  # converts and compiles
    torch.cuda.synchronize()
    after_first = torch.cuda.memory_reserved()
    for _ in range(2):
        torchntk.ntk(model, x1, x2, implementation="structured_derivatives")
    torch.cuda.synchronize()
    assert torch.cuda.memory_reserved() <= after_first


def test_torch_cache_released_when_max_memory_asks_for_it():
    _needs_jax_gpu()
    model, x1, x2 = make("mlp", dtype=torch.float32, n1=4, n2=4)
    expected = oracle_ntk(copy.deepcopy(model).double(), *(tuple(x.double() for x in side) for side in (x1, x2)))
    model, x1, x2 = _on(torch.device("cuda", 0), model, x1, x2)
    torch.cuda.empty_cache()
    free = torch.cuda.mem_get_info()[0]
    block = torch.empty(free // 4, dtype=torch.uint8, device="cuda")
    del block  # torch keeps it cached: reserved, not allocated, and not free for JAX
    cached = torch.cuda.memory_reserved() - torch.cuda.memory_allocated()
    assert cached >= free // 4
    kernel = torchntk.ntk(model, x1, x2, implementation="structured_derivatives", max_memory=int(free * 0.9))
    assert torch.cuda.memory_reserved() - torch.cuda.memory_allocated() < cached
    _assert_close(kernel.double(), expected, 1e-4)


def test_a_tile_out_of_memory_on_the_gpu_is_retried_smaller(monkeypatch):
    """The OOM is faked (the first, whole tile raises XLA's RESOURCE_EXHAUSTED); its halves run on the GPU for real
    (JAX slices of device arrays, torch.cat on the device) and give the same kernel."""
    _needs_jax_gpu()
    import jax

    model, x1, x2 = make("residual", n1=4, n2=3)
    expected = oracle_ntk(model, x1, x2)
    model, x1, x2 = _on(torch.device("cuda", 0), model, x1, x2)
    compiled = torch_glue.compiled_ntk_fn
    tried = []

    def failing_first(problem, converted, args, rows=None):
        run = compiled(problem, converted, args, rows)

        def guarded(inputs1, inputs2, params):
            tried.append((inputs1[0].shape[0], inputs2[0].shape[0]))
            if len(tried) == 1:
                raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1 bytes.")
            return run(inputs1, inputs2, params)

        return guarded

    monkeypatch.setattr(torch_glue, "compiled_ntk_fn", failing_first)
    kernel = torchntk.ntk(model, x1, x2, implementation="structured_derivatives")
    assert tried == [(4, 3), (2, 3), (2, 3)]
    assert kernel.device.type == "cuda"
    _assert_close(kernel, expected, 1e-10)


def test_auto_on_cuda_says_its_time_model_is_not_fitted():
    model, x1, x2 = make("mlp", n1=3, n2=2)
    model, x1, x2 = _on(torch.device("cuda", 0), model, x1, x2)
    explanation = torchntk.explain(model, x1, x2)
    assert explanation.time_model == "flop-byte"
    assert "no time model is fitted for cuda" in explanation.reason
    assert torchntk.ntk(model, x1, x2).device.type == "cuda"
