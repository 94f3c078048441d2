"""Structured derivatives multiply float32 at torch's float32 matmul precision, and the conversion's check at full
float32 precision.

JAX's default lets XLA multiply float32 in TF32 on a GPU: on an H200 float32 structured kernels were 0.3–1.3% off
Jacobian contraction's, and the check refused correct conversions of resnets (1e-4 to 7e-4). XLA:CPU computes in
float32 whatever it is told, but keeps the precision in the compiled program, so here the programs themselves are
read; ``test_gpu_cuda.py`` measures the kernels on a GPU.
"""

from __future__ import annotations

import copy
import re
import threading

import pytest
import torch
from _oracle import oracle_ntk
from _zoo import make

import torchntk
from torchntk._precision import float32_throughout
from torchntk.bridge import device, torch_glue
from torchntk.converters import check, to_jax


@pytest.fixture
def torch_precision():
    """Sets torch's float32 matmul precision for one test; restores it after."""
    before = torch.get_float32_matmul_precision()
    yield torch.set_float32_matmul_precision
    torch.set_float32_matmul_precision(before)


def _products(program) -> list[str]:
    """The dot and convolution instructions of a compiled program's HLO."""
    return [line for line in program.as_text().splitlines() if re.search(r"= \S+ (dot|convolution)\(", line)]


def _new_programs(before: dict) -> list:
    return [program for key, program in torch_glue._COMPILED.items() if key not in before]


@pytest.mark.parametrize(("torch_name", "jax_name"), [("highest", "highest"), ("high", "high"), ("medium", "default")])
def test_jax_precision_follows_torchs_float32_matmul_precision(torch_precision, torch_name, jax_name):
    torch_precision(torch_name)
    assert device.jax_matmul_precision() == jax_name


def test_structured_programs_are_traced_at_torchs_precision_and_keyed_by_it(torch_precision):
    model, x1, x2 = make("cnn_bn", dtype=torch.float32, n1=3, n2=2)
    expected = oracle_ntk(model.double(), tuple(x.double() for x in x1), tuple(x.double() for x in x2))
    model = model.float()
    kernels, programs = {}, {}
    for name in ("highest", "medium", "highest"):
        torch_precision(name)
        before = dict(torch_glue._COMPILED)
        kernels[name] = torchntk.ntk(model, x1, x2, implementation="structured_derivatives")
        programs.setdefault(name, []).append(_new_programs(before))
    first, medium, again = programs["highest"][0], programs["medium"][0], programs["highest"][1]
    assert first and medium, "each precision compiles its own programs (another's is never served)"
    assert again == [], "the first precision's programs are served again"
    for program in first:  # XLA takes float32 where an operand asks for it (the patches' exact filter: default)
        products = _products(program)
        assert products and all(re.search(r"operand_precision=\{[a-z,]*highest", line) for line in products)
    for program in medium:
        assert not any("operand_precision={highest" in line for line in _products(program))
    for kernel in kernels.values():  # XLA:CPU multiplies in float32 either way
        assert ((kernel.double() - expected).abs().max() / expected.abs().max()).item() < 1e-5


def test_the_check_runs_at_full_float32_precision_whatever_torchs(torch_precision, monkeypatch):
    torch_precision("medium")
    seen = []
    real = check._run_once

    def recording(fn, *args, **kwargs):
        import jax

        seen.append(jax.config.jax_default_matmul_precision)
        return real(fn, *args, **kwargs)

    monkeypatch.setattr(check, "_run_once", recording)
    model, x1, _ = make("mlp", dtype=torch.float32, n1=2)
    to_jax(model.eval(), tuple(x[:1] for x in x1), route="onnx-jax")
    assert seen and set(seen) == {"highest"}


def test_float32_throughout_sets_torchs_flags_and_restores_them(torch_precision):
    torch_precision("medium")
    cudnn = torch.backends.cudnn.allow_tf32
    with float32_throughout():
        assert torch.get_float32_matmul_precision() == "highest" and torch.backends.cudnn.allow_tf32 is False
    assert torch.get_float32_matmul_precision() == "medium" and torch.backends.cudnn.allow_tf32 == cudnn
    with pytest.raises(RuntimeError, match="inside"), float32_throughout():
        raise RuntimeError("inside")
    assert torch.get_float32_matmul_precision() == "medium" and torch.backends.cudnn.allow_tf32 == cudnn


def test_overlapping_calls_restore_torchs_flags_once_the_last_leaves(monkeypatch):
    """Two threads' calls overlap: the first to leave must not turn TF32 back on under the other, and the flags end
    as the user had them (each call restoring its own copy left them off for good)."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    entered, first_left, seen = threading.Event(), threading.Event(), []

    def second() -> None:
        with float32_throughout():
            entered.set()
            first_left.wait(timeout=10)
            seen.append(torch.backends.cudnn.allow_tf32)

    thread = threading.Thread(target=second)
    with float32_throughout():
        thread.start()
        assert entered.wait(timeout=10)
    first_left.set()
    thread.join(timeout=10)
    assert seen == [False]
    assert torch.backends.cudnn.allow_tf32 is True and torch.get_float32_matmul_precision() == "highest"


def _recording(seen: list, fn):
    def recorded(*args, **kwargs):
        seen.append((torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32))
        return fn(*args, **kwargs)

    return recorded


@pytest.mark.parametrize("implementation", ["auto", *torchntk.IMPLEMENTATIONS])
def test_every_method_computes_float32_throughout_unless_asked_otherwise(torch_precision, monkeypatch, implementation):
    """cuDNN's default lets torch convolve float32 in TF32: resnet18's float32 kernel on an H200 was 2.3% off by
    Jacobian contraction and NTK-vector products. During ``ntk`` it is off, unless the user asked torch for reduced
    precision; torch's flags are as they were after."""
    seen: list = []
    for name, fn in list(torchntk.IMPLEMENTATIONS.items()):
        monkeypatch.setitem(torchntk.IMPLEMENTATIONS, name, _recording(seen, fn))
    model, x1, x2 = make("cnn_bn", n1=2, n2=2)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)  # torch's default
    torchntk.ntk(model, x1, x2, implementation=implementation)
    assert seen and set(seen) == {("highest", False)}
    assert torch.backends.cudnn.allow_tf32 is True
    seen.clear()
    torch_precision("high")
    torchntk.ntk(model, x1, x2, implementation=implementation)
    assert seen and set(seen) == {("high", True)}


def test_ntk_vp_computes_float32_throughout(monkeypatch):
    seen: list = []
    monkeypatch.setattr(torchntk._api, "ntk_vector_product", _recording(seen, torchntk._api.ntk_vector_product))
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    model, x1, x2 = make("mlp", n1=2, n2=3)
    torchntk.ntk_vp(model, x1, x2, torch.randn(3, 3, dtype=torch.float64))  # v: [N2, O]
    assert seen == [("highest", False)] and torch.backends.cudnn.allow_tf32 is True


@pytest.mark.parametrize("route", ["onnx-jax", "onnx-tf"])
def test_each_routes_function_takes_the_precision_it_is_traced_under(route):
    """Neither route's converted function fixes a precision of its own (an explicit one would keep TF32 on a GPU
    whatever structured derivatives ask for): its products follow the precision it is traced under."""
    import jax

    if route == "onnx-tf":
        pytest.importorskip("tf2jax")
    model, x1, _ = make("cnn_bn", dtype=torch.float32, n1=1)
    converted = to_jax(model.eval(), x1, route=route)
    example = [jnp_array(x[0]) for x in x1]
    params = dict(converted.params)
    for precision, wanted in (("highest", True), ("default", False)):
        with jax.default_matmul_precision(precision):
            program = jax.jit(converted.fn).lower(params, *example).compile()
        products = _products(program)
        assert products
        assert all(bool(re.search(r"operand_precision=\{[a-z,]*highest", line)) == wanted for line in products)


def jnp_array(tensor: torch.Tensor):
    import jax.numpy as jnp

    return jnp.asarray(tensor.numpy())


@pytest.mark.parametrize("implementation", ["auto", *torchntk.IMPLEMENTATIONS])
def test_a_call_under_the_callers_autocast_computes_the_models_own_kernel(implementation):
    """Under ``torch.autocast`` every method failed deep inside torch.func (``expected scalar type BFloat16 but found
    Float``) or the conversion; the kernel is now the float32 model's, autocast back on after."""
    model, x1, x2 = make("cnn_bn", dtype=torch.float32, n1=3, n2=2)
    expected = oracle_ntk(copy.deepcopy(model).double(), *(tuple(x.double() for x in side) for side in (x1, x2)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        kernel = torchntk.ntk(model, x1, x2, implementation=implementation)
        assert torch.is_autocast_enabled("cpu")
    assert kernel.dtype == torch.float32
    assert ((kernel.double() - expected).abs().max() / expected.abs().max()).item() < 1e-5


def test_ntk_vp_under_the_callers_autocast():
    model, x1, x2 = make("mlp", dtype=torch.float32, n1=2, n2=3)
    v = torch.randn(3, 3)
    expected = torchntk.ntk_vp(model, x1, x2, v)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = torchntk.ntk_vp(model, x1, x2, v)
    assert got.dtype == torch.float32 and torch.allclose(got, expected, rtol=1e-6, atol=1e-7)


def test_explain_and_linalg_under_the_callers_autocast():
    model, x1, _ = make("mlp", dtype=torch.float32, n1=4)
    expected = torchntk.eigvalsh(model, x1, k=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torchntk.explain(model, x1).choice in torchntk.IMPLEMENTATIONS
        eigenvalues = torchntk.eigvalsh(model, x1, k=2)
        prediction = torchntk.kernel_regression(model, x1, torch.randn(4, 3), x1[:2])
    assert eigenvalues.dtype == torch.float32 and torch.allclose(eigenvalues, expected, rtol=1e-5)
    assert prediction.dtype == torch.float32
