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

import numpy as np
import pytest
import torch
from _oracle import oracle_ntk
from _zoo import make

import torchntk
from torchntk import _precision as precision
from torchntk._precision import float32_throughout, in_float32_everywhere, reduced_precision_requested
from torchntk.bridge import device, torch_glue
from torchntk.converters import check, clear_memory_cache, to_jax

# Every node of torch's float32 precision settings (torch.backends[.<backend>[.<op>]].fp32_precision).
_NODES = [(), ("cuda", "matmul"), ("cudnn",), ("cudnn", "conv"), ("cudnn", "rnn"), ("mkldnn",), ("mkldnn", "matmul")]
_NODES += [("mkldnn", "conv"), ("mkldnn", "rnn")]


def _settings() -> dict:
    """torch's float32 precision settings as they are written (``"none"``: the parent's); the list is the test's
    own, so that a node the library forgets still counts."""
    return {path: precision._node(path).fp32_precision for path in _NODES}


@pytest.fixture
def torch_precision():
    """Sets torch's float32 matmul precision (the legacy call) for one test; every setting restored after (a legacy
    flag left behind makes torch.export raise in later tests)."""
    before = precision.snapshot()
    yield torch.set_float32_matmul_precision
    precision.restore(before)


def _products(program) -> list[str]:
    """The dot and convolution instructions of a compiled program's HLO."""
    return [line for line in program.as_text().splitlines() if re.search(r"= \S+ (dot|convolution)\(", line)]


def _new_programs(before: dict) -> list:
    return [program for key, program in torch_glue._COMPILED.items() if key not in before]


@pytest.mark.parametrize(("torch_name", "jax_name"), [("highest", "highest"), ("high", "high"), ("medium", "default")])
def test_jax_precision_follows_torchs_float32_matmul_precision(torch_precision, torch_name, jax_name):
    torch_precision(torch_name)
    assert device.jax_matmul_precision() == jax_name


@pytest.mark.parametrize(
    ("path", "value", "jax_name"),
    [((), "tf32", "high"), (("cuda", "matmul"), "tf32", "high"), (("mkldnn", "matmul"), "bf16", "default")],
)
def test_jax_precision_follows_torchs_fp32_precision_settings(torch_precision, path, value, jax_name):
    precision._node(path).fp32_precision = value
    assert device.jax_matmul_precision() == jax_name and reduced_precision_requested()


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
    real = check._compiled

    def recording(fn, *args, **kwargs):
        import jax

        seen.append(jax.config.jax_default_matmul_precision)
        return real(fn, *args, **kwargs)

    monkeypatch.setattr(check, "_compiled", recording)
    model, x1, _ = make("mlp", dtype=torch.float32, n1=2)
    to_jax(model.eval(), tuple(x[:1] for x in x1), route="onnx-jax")
    assert seen and set(seen) == {"highest"}


@pytest.mark.parametrize("settings", ["defaults", "reduced"])
def test_float32_throughout_sets_every_leaf_and_restores_them_as_written(torch_precision, settings):
    if settings == "reduced":  # the new API, leaves and root written
        torch.backends.cuda.matmul.fp32_precision, torch.backends.mkldnn.matmul.fp32_precision = "tf32", "bf16"
        torch.backends.fp32_precision = "tf32"
    before = _settings()
    with float32_throughout():
        assert in_float32_everywhere() and not reduced_precision_requested()
    assert _settings() == before  # "none" stays "none": the parent's setting keeps applying
    with pytest.raises(RuntimeError, match="inside"), float32_throughout():
        raise RuntimeError("inside")
    assert _settings() == before


def _legacy() -> dict:
    """torch's legacy getters, each its value or "raises" (where torch's two APIs disagree)."""
    out = {}
    for name, read in (
        ("matmul", torch.get_float32_matmul_precision),
        ("cudnn", lambda: torch.backends.cudnn.allow_tf32),
        ("cuda matmul", lambda: torch.backends.cuda.matmul.allow_tf32),
    ):
        try:
            out[name] = read()
        except RuntimeError:
            out[name] = "raises"
    return out


def _write(state: str) -> None:
    if state == "legacy high":
        torch.set_float32_matmul_precision("high")
    elif state == "legacy cudnn off":
        torch.backends.cudnn.allow_tf32 = False
    elif state == "new matmul tf32":  # the legacy matmul getter raises from here on
        torch.backends.cuda.matmul.fp32_precision = "tf32"
    elif state == "new root tf32, oneDNN bf16":
        torch.backends.fp32_precision, torch.backends.mkldnn.matmul.fp32_precision = "tf32", "bf16"
    elif state == "new conv ieee":  # cuDNN's legacy getter raises from here on
        torch.backends.cudnn.conv.fp32_precision = "ieee"


@pytest.mark.parametrize(
    "state",
    ["defaults", "legacy high", "legacy cudnn off", "new matmul tf32", "new root tf32, oneDNN bf16", "new conv ieee"],
)
def test_inside_torchs_two_apis_agree_and_after_they_are_as_written(torch_precision, state):
    """Inside, torch's own code may read the legacy flags (aten's convolution asks cudnn.allow_tf32), which raise
    where they disagree with the new settings: torch.export failed inside a call that had set only the new ones.
    After, the new settings are exactly as written, and the legacy flags too where torch let them be read."""
    _write(state)
    before, legacy = _settings(), _legacy()
    with float32_throughout():
        assert "raises" not in _legacy().values() and in_float32_everywhere()
    assert _settings() == before
    assert {k: v for k, v in _legacy().items() if legacy[k] != "raises"} == {
        k: v for k, v in legacy.items() if v != "raises"
    }


def test_a_fresh_conversion_inside_a_call(monkeypatch, tmp_path):
    """torch.export runs inside float32_throughout: it failed there once (cuDNN's legacy flag read by aten's
    convolution disagreed with the new settings)."""
    monkeypatch.setenv("TORCHNTK_CACHE_DIR", str(tmp_path))
    clear_memory_cache()
    model, x1, x2 = make("cnn_bn", n1=2, n2=2)
    kernel = torchntk.ntk(model, x1, x2, implementation="structured_derivatives")
    expected = oracle_ntk(model, x1, x2)
    assert ((kernel - expected).abs().max() / expected.abs().max()).item() < 1e-10


def test_overlapping_calls_restore_torchs_flags_once_the_last_leaves(torch_precision):
    """Two threads' calls overlap: the first to leave must not turn TF32 back on under the other, and the settings
    end as the user had them (each call restoring its own copy left them off for good)."""
    before = _settings()
    entered, first_left, seen = threading.Event(), threading.Event(), []

    def second() -> None:
        with float32_throughout():
            entered.set()
            first_left.wait(timeout=10)
            seen.append(in_float32_everywhere())

    thread = threading.Thread(target=second)
    with float32_throughout():
        thread.start()
        assert entered.wait(timeout=10)
    first_left.set()
    thread.join(timeout=10)
    assert seen == [True]
    assert _settings() == before


def _recording(seen: list, fn):
    def recorded(*args, **kwargs):
        seen.append(in_float32_everywhere())
        return fn(*args, **kwargs)

    return recorded


@pytest.mark.parametrize("implementation", ["auto", *torchntk.IMPLEMENTATIONS])
def test_every_method_computes_float32_throughout_unless_asked_otherwise(torch_precision, monkeypatch, implementation):
    """cuDNN's default lets torch convolve float32 in TF32: resnet18's float32 kernel on an H200 was 2.3% off by
    Jacobian contraction and NTK-vector products. During ``ntk`` every leaf is float32, unless the user asked torch
    for reduced precision; torch's settings are as they were after."""
    seen: list = []
    for name, fn in list(torchntk.IMPLEMENTATIONS.items()):
        monkeypatch.setitem(torchntk.IMPLEMENTATIONS, name, _recording(seen, fn))
    model, x1, x2 = make("cnn_bn", n1=2, n2=2)
    before = _settings()
    assert before[("cudnn", "conv")] == "tf32"  # torch's default
    torchntk.ntk(model, x1, x2, implementation=implementation)
    assert seen and set(seen) == {True}
    assert _settings() == before
    seen.clear()
    torch_precision("high")
    torchntk.ntk(model, x1, x2, implementation=implementation)
    assert seen and set(seen) == {False}


def test_a_call_works_where_torchs_legacy_precision_getters_raise(torch_precision, monkeypatch):
    """torch's legacy getters raise once its two precision APIs disagree (a user who wrote the new one:
    ``RuntimeError: ... mix of the legacy and new APIs``): torchntk reads and writes only the new one."""

    def mixed(*args, **kwargs):
        raise RuntimeError("PyTorch is checking the matmul precision ... mix of the legacy and new APIs")

    torch.backends.cuda.matmul.fp32_precision = "tf32"
    monkeypatch.setattr(torch, "get_float32_matmul_precision", mixed)
    before = _settings()
    model, x1, x2 = make("mlp", dtype=torch.float32, n1=2, n2=2)
    for implementation in ("auto", *torchntk.IMPLEMENTATIONS):
        torchntk.ntk(model, x1, x2, implementation=implementation)
    assert _settings() == before and reduced_precision_requested()


def test_ntk_vp_computes_float32_throughout(torch_precision, monkeypatch):
    seen: list = []
    monkeypatch.setattr(torchntk._api, "ntk_vector_product", _recording(seen, torchntk._api.ntk_vector_product))
    before = _settings()
    model, x1, x2 = make("mlp", n1=2, n2=3)
    torchntk.ntk_vp(model, x1, x2, torch.randn(3, 3, dtype=torch.float64))  # v: [N2, O]
    assert seen == [True] and _settings() == before


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
    for jax_precision, wanted in (("highest", True), ("default", False)):
        with jax.default_matmul_precision(jax_precision):
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


def test_a_conversion_under_the_callers_autocast_is_of_the_models_own_function(monkeypatch, tmp_path):
    """Under ``torch.autocast`` ``to_jax`` failed on bfloat16 (``Got unsupported ScalarType BFloat16``); it converts
    the float32 model's function, which equals the model's float32 output."""
    import jax.numpy as jnp

    monkeypatch.setenv("TORCHNTK_CACHE_DIR", str(tmp_path))  # exported here, not answered by a cache
    clear_memory_cache()
    model, x1, _ = make("residual", dtype=torch.float32, n1=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        converted = to_jax(model.eval(), x1, route="onnx-jax")
    got = torch.from_numpy(np.array(converted.fn(dict(converted.params), jnp.asarray(x1[0][0].numpy()))))
    expected = model(x1[0])[0].detach()
    assert got.dtype == torch.float32 and torch.allclose(got, expected, rtol=1e-5, atol=1e-6)
