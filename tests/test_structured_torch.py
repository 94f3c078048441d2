"""torchntk.ntk(..., implementation="structured_derivatives") end to end against the explicit-Jacobian oracle."""

from __future__ import annotations

import jax
import pytest
import torch
from _oracle import oracle_ntk
from _zoo import ZOO, make

import torchntk
from torchntk.bridge.torch_glue import to_jax_array, to_torch

AXES = [((), ()), ((-1,), ()), ((), (-1,)), ((), (0,))]


def _assert_close(actual, expected, tol):
    scale = expected.abs().max().clamp_min(1e-30)
    assert actual.shape == expected.shape
    assert ((actual - expected).abs().max() / scale).item() < tol


@pytest.mark.parametrize("trace_axes, diagonal_axes", AXES)
@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_float64(name, trace_axes, diagonal_axes):
    model, x1, x2 = make(name, n1=3, n2=3)
    kernel = torchntk.ntk(
        model, x1, x2, implementation="structured_derivatives", trace_axes=trace_axes, diagonal_axes=diagonal_axes
    )
    assert kernel.dtype == torch.float64
    expected = oracle_ntk(model, x1, x2, trace_axes=trace_axes, diagonal_axes=diagonal_axes)
    _assert_close(kernel, expected, 1e-10)
    assert not jax.config.jax_enable_x64  # float64 never switched on for the rest of the process


@pytest.mark.parametrize("name", ["mlp", "cnn_bn", "residual"])
def test_float32_and_tiles(name):
    model, x1, x2 = make(name, dtype=torch.float32, n1=5, n2=3)
    expected = oracle_ntk(model, x1, x2)
    for chunk_size in (None, 2):
        kernel = torchntk.ntk(model, x1, x2, implementation="structured_derivatives", chunk_size=chunk_size)
        assert kernel.dtype == torch.float32
        _assert_close(kernel, expected, 1e-4)
    symmetric = torchntk.ntk(model, x1, implementation="structured_derivatives", chunk_size=2)
    _assert_close(symmetric, oracle_ntk(model, x1, None), 1e-4)


def test_parameter_subset_and_new_weights_reuse_the_conversion():
    model, x1, x2 = make("cnn_bn")
    names = ["0.weight", "5.bias"]
    _assert_close(
        torchntk.ntk(model, x1, x2, implementation="structured_derivatives", params=names),
        oracle_ntk(model, x1, x2, names=names),
        1e-10,
    )
    with torch.no_grad():
        model[0].weight.mul_(1.5)  # a training step: same architecture, new values
    _assert_close(
        torchntk.ntk(model, x1, x2, implementation="structured_derivatives"), oracle_ntk(model, x1, x2), 1e-10
    )


def test_dlpack_round_trip_shares_memory():
    tensor = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    array = to_jax_array(tensor, "cpu")
    back = to_torch(array, torch.device("cpu"))
    assert torch.equal(back, tensor)
    assert back.data_ptr() == array.unsafe_buffer_pointer()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_model_stays_on_cuda():
    model, x1, x2 = make("cnn_bn", dtype=torch.float32)
    expected = oracle_ntk(model, x1, x2)
    model = model.cuda()
    kernel = torchntk.ntk(
        model, tuple(x.cuda() for x in x1), tuple(x.cuda() for x in x2), implementation="structured_derivatives"
    )
    assert kernel.device.type == "cuda"
    _assert_close(kernel.cpu(), expected, 1e-4)


@pytest.mark.slow
def test_resnet18_small_input():
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=3).eval()
    for module in model.modules():  # non-trivial running statistics
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    x1, x2 = (torch.randn(2, 3, 32, 32),), (torch.randn(2, 3, 32, 32),)
    kernel = torchntk.ntk(model, x1, x2, implementation="structured_derivatives")
    reference = torchntk.ntk(model, x1, x2, implementation="jacobian_contraction")
    _assert_close(kernel, reference, 1e-4)


class Scatters(torch.nn.Module):
    """Slice and index assignments (exported as ONNX ScatterND) on a parameter-dependent tensor, as swin's masks."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = torch.nn.Linear(6, 8), torch.nn.Linear(8, 3)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        y = torch.zeros_like(h)
        y[:, 2:6] = h[:, :4] * 2.0
        z = y.clone()
        z[:, torch.tensor([1, 7])] = h[:, [0, 3]]
        acc = torch.zeros(8, x.shape[0], dtype=x.dtype).index_put((torch.tensor([0, 5, 0]),), h[:, 5:8].T, True)
        return self.b(z + y + acc.T)


@pytest.mark.parametrize("trace_axes, diagonal_axes", AXES)
def test_scatter_assignments_float64(trace_axes, diagonal_axes):
    torch.manual_seed(0)
    model = Scatters().double().eval()
    x1, x2 = torch.randn(3, 6, dtype=torch.float64), torch.randn(3, 6, dtype=torch.float64)
    kernel = torchntk.ntk(
        model, x1, x2, implementation="structured_derivatives", trace_axes=trace_axes, diagonal_axes=diagonal_axes
    )
    expected = oracle_ntk(model, (x1,), (x2,), trace_axes=trace_axes, diagonal_axes=diagonal_axes)
    _assert_close(kernel, expected, 1e-10)


def test_a_short_call_repeated_until_it_paid_for_it_is_recompiled_optimised(monkeypatch):
    """Ski rental on the fast tier: once a fast program's runs have cost UPGRADE_AFTER_COMPILES times its compile,
    the next call compiles and uses the optimised program (same kernel); a fast program whose compile time is not
    known (loaded from the persistent cache without a note of it) is never upgraded."""
    from torchntk.bridge import compile_tiers, torch_glue

    monkeypatch.setattr(torch_glue, "_COMPILED", {})
    model, x1, x2 = make("mlp", n1=3, n2=3)
    expected = oracle_ntk(model, x1, x2)

    def call_and_tiers() -> list[str]:
        _assert_close(torchntk.ntk(model, x1, x2, implementation="structured_derivatives"), expected, 1e-10)
        return sorted({key[-1] for key in torch_glue._COMPILED})

    assert call_and_tiers() == ["fast"]
    (fast,) = torch_glue._COMPILED.values()
    assert isinstance(fast, compile_tiers.FastProgram) and fast.run_seconds > 0
    fast.compile_seconds = float("inf")
    fast.run_seconds = 1e6
    assert call_and_tiers() == ["fast"]  # unknown compile time: kept
    fast.compile_seconds = fast.run_seconds / compile_tiers.UPGRADE_AFTER_COMPILES  # its runs paid for it
    assert call_and_tiers() == ["fast", "optimised"]
    assert call_and_tiers() == ["fast", "optimised"]  # and later calls use it
    assert len(torch_glue._COMPILED) == 2


def test_compile_tiers(monkeypatch):
    """A short call (≤ 2 tiles) compiles without LLVM's optimisations; a long one compiles the optimised program,
    which later calls of its shapes use; both give the oracle's kernel. TORCHNTK_FAST_COMPILE=0 turns the tier off."""
    from torchntk.bridge import torch_glue

    monkeypatch.setattr(torch_glue, "_COMPILED", {})
    model, x1, x2 = make("mlp", n1=3, n2=3)
    expected = oracle_ntk(model, x1, x2)

    def tiers() -> list[str]:
        return sorted({key[-1] for key in torch_glue._COMPILED})

    _assert_close(torchntk.ntk(model, x1, x2, implementation="structured_derivatives"), expected, 1e-10)
    assert tiers() == ["fast"]
    _assert_close(torchntk.ntk(model, x1, x2, implementation="structured_derivatives", chunk_size=1), expected, 1e-10)
    assert tiers() == ["fast", "optimised"]  # 9 tiles: the optimised programs, for tiles of one example
    compiled = len(torch_glue._COMPILED)
    one1, two2 = tuple(x[:1] for x in x1), tuple(x[:2] for x in x2)
    kernel = torchntk.ntk(model, one1, two2, implementation="structured_derivatives", chunk_size=1)
    _assert_close(kernel, expected[:1, :2], 1e-10)
    assert len(torch_glue._COMPILED) == compiled  # a short call (2 tiles) of those shapes: the optimised programs
    monkeypatch.setattr(torch_glue, "_COMPILED", {})
    monkeypatch.setenv("TORCHNTK_FAST_COMPILE", "0")
    _assert_close(torchntk.ntk(model, x1, x2, implementation="structured_derivatives"), expected, 1e-10)
    assert tiers() == ["optimised"]


def test_fast_tier_level_follows_flops_per_operation():
    """A short call's program compiles at LLVM O1 where its operations are heavy (its O0 run would cost more than
    O1's longer compile: at fewer flops per operation for convolutions than for GEMMs, library calls nearly as fast
    at O0) and at O0 where they are light, with XLA's classic fusion emitters except at O1 without convolutions;
    the choice reads the lowered program only, so every process makes the same one."""
    import jax
    import jax.numpy as jnp

    from torchntk.bridge.compile_tiers import O1_FROM_FLOPS_PER_OPERATION, fast_options

    def conv(a, w):
        return jnp.tanh(jax.lax.conv_general_dilated(a, w, (1, 1), "SAME")) * 2

    images, kernel = jnp.ones((4, 64, 32, 32), jnp.float32), jnp.ones((64, 64, 3, 3), jnp.float32)
    heavy_conv = jax.jit(conv).lower(images, kernel)
    heavy_gemm = jax.jit(lambda a: jnp.tanh(a @ a) * 2).lower(jnp.ones((256, 256), jnp.float32))

    def many_small(a):
        for _ in range(50):
            a = jnp.sin(a) + 1
        return a

    small = jax.jit(many_small).lower(jnp.ones(8, jnp.float32))
    heaviest_gemm = jax.jit(lambda a: jnp.tanh(a @ a) * 2).lower(jnp.ones((4096, 4096), jnp.float32))

    def per_operation(lowered):
        return lowered.cost_analysis()["flops"] / lowered.as_text().count("stablehlo.")

    for heavy in (heavy_conv, heavy_gemm):
        assert per_operation(heavy) > O1_FROM_FLOPS_PER_OPERATION["convolutional"]
    assert per_operation(heavy_gemm) < O1_FROM_FLOPS_PER_OPERATION["other"] < per_operation(heaviest_gemm)
    classic = {"xla_cpu_use_fusion_emitters": False}
    assert fast_options(heavy_conv) == {"xla_backend_optimization_level": 1, **classic}
    assert fast_options(heavy_gemm) == {"xla_backend_optimization_level": 0, **classic}
    assert fast_options(heaviest_gemm) == {"xla_backend_optimization_level": 1}
    assert fast_options(small) == {"xla_backend_optimization_level": 0, **classic}
    assert fast_options(small) == fast_options(jax.jit(many_small).lower(jnp.ones(8, jnp.float32)))
    assert heavy_conv.compile(fast_options(heavy_conv))(images, kernel).shape == images.shape
