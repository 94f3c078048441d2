"""Jacobian contraction and NTK-vector products against the explicit-Jacobian oracle."""

from __future__ import annotations

import pytest
import torch
from _oracle import oracle_ntk
from _zoo import ZOO, make

import torchntk

METHODS = ["jacobian_contraction", "ntk_vector_products"]
AXES = [((), ()), ((-1,), ()), ((), (-1,))]


def _assert_close(actual, expected, dtype):
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    scale = expected.abs().max().clamp_min(1e-30)
    assert actual.shape == expected.shape
    assert ((actual - expected).abs().max() / scale).item() < tol


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("trace_axes, diagonal_axes", AXES)
@pytest.mark.parametrize("name", list(ZOO))
@pytest.mark.parametrize("method", METHODS)
def test_matches_oracle(method, name, trace_axes, diagonal_axes, dtype):
    model, x1, x2 = make(name, dtype)
    kernel = torchntk.ntk(model, x1, x2, implementation=method, trace_axes=trace_axes, diagonal_axes=diagonal_axes)
    expected = oracle_ntk(model, x1, x2, trace_axes=trace_axes, diagonal_axes=diagonal_axes)
    assert kernel.dtype == dtype
    _assert_close(kernel, expected, dtype)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(
    "trace_axes, diagonal_axes",
    [((1,), (2,)), ((-2, -1), ()), ((), (0, 1)), ((2,), (0, -1)), ((1, 3), (0,)), ((), (1, 2, 3))],
)
def test_multi_axis_outputs(method, trace_axes, diagonal_axes):
    model, x1, x2 = make("conv_map", n1=2, n2=2)
    kernel = torchntk.ntk(model, x1, x2, implementation=method, trace_axes=trace_axes, diagonal_axes=diagonal_axes)
    expected = oracle_ntk(model, x1, x2, trace_axes=trace_axes, diagonal_axes=diagonal_axes)
    _assert_close(kernel, expected, torch.float64)


@pytest.mark.parametrize("method", METHODS)
def test_per_example_kernels(method):
    model, x1, x2 = make("cnn_bn", n1=3, n2=3)
    kernel = torchntk.ntk(model, x1, x2, implementation=method, diagonal_axes=(0,))
    assert kernel.shape == (3, 3, 3)
    _assert_close(kernel, oracle_ntk(model, x1, x2, diagonal_axes=(0,)), torch.float64)


@pytest.mark.parametrize("method", METHODS)
def test_symmetric_and_chunked(method):
    model, x1, _ = make("residual", n1=5)
    full = torchntk.ntk(model, x1, implementation=method)
    assert torch.allclose(full, full.permute(1, 0, 3, 2), rtol=0, atol=1e-12)
    _assert_close(full, oracle_ntk(model, x1, None), torch.float64)
    for chunk in (1, 2):
        chunked = torchntk.ntk(model, x1, implementation=method, chunk_size=chunk)
        assert torch.allclose(chunked, full, rtol=1e-12, atol=1e-12)
        _, x1b, x2b = make("residual", n1=5, n2=4, seed=1)
        assert torch.allclose(
            torchntk.ntk(model, x1b, x2b, implementation=method, chunk_size=chunk),
            torchntk.ntk(model, x1b, x2b, implementation=method),
            rtol=1e-12,
            atol=1e-12,
        )


@pytest.mark.parametrize("method", METHODS)
def test_parameter_subsets(method):
    model, x1, x2 = make("mlp")
    names = ["0.weight", "4.bias"]
    expected = oracle_ntk(model, x1, x2, names=names)
    by_list = torchntk.ntk(model, x1, x2, implementation=method, params=names)
    by_predicate = torchntk.ntk(model, x1, x2, implementation=method, params=lambda n, p: n in names)
    _assert_close(by_list, expected, torch.float64)
    _assert_close(by_predicate, expected, torch.float64)


@pytest.mark.parametrize("method", METHODS)
def test_params_dict_replaces_values(method):
    model, x1, x2 = make("mlp")
    other, _, _ = make("mlp", seed=7)
    values = {n: p.detach() for n, p in other.named_parameters()}
    kernel = torchntk.ntk(model, x1, x2, implementation=method, params=values)
    _assert_close(kernel, oracle_ntk(other, x1, x2), torch.float64)
    assert not torch.equal(model[0].weight, other[0].weight)


def test_requires_grad_false_is_not_theta():
    model, x1, x2 = make("mlp")
    model[0].weight.requires_grad_(False)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    _assert_close(torchntk.ntk(model, x1, x2), oracle_ntk(model, x1, x2, names=names), torch.float64)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", list(ZOO))
def test_model_state_unchanged_and_result_detached(name, method):
    model, x1, x2 = make(name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    parameters = {n: p for n, p in model.named_parameters(remove_duplicate=False)}
    out_before = model(*x1)
    kernel = torchntk.ntk(model, x1, x2, implementation=method)
    torchntk.ntk_vp(model, x1, x2, torch.ones(2, *out_before.shape[1:], dtype=torch.float64))
    assert not kernel.requires_grad
    assert {n: p for n, p in model.named_parameters(remove_duplicate=False)} == parameters
    assert all(isinstance(p, torch.nn.Parameter) for p in parameters.values())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    assert torch.equal(model(*x1), out_before)


@pytest.mark.parametrize("method", METHODS)
def test_ntk_vp_matches_kernel(method):
    model, x1, x2 = make("conv_map", n1=3, n2=2)
    kernel = torchntk.ntk(model, x1, x2, implementation=method)  # (N1, N2, C, C, H, H, W, W)
    v = torch.randn(2, 2, 3, 3, dtype=torch.float64)
    expected = torch.einsum("nmaAbBcC,mABC->nabc", kernel, v)
    assert torch.allclose(torchntk.ntk_vp(model, x1, x2, v), expected, rtol=1e-10, atol=1e-12)
    assert torch.allclose(torchntk.ntk_vp(model, x1, x2, v, chunk_size=1), expected, rtol=1e-10, atol=1e-12)
    several = torch.stack([v, 2 * v])
    out = torchntk.ntk_vp(model, x1, x2, several)
    assert out.shape == (2, 3, 2, 3, 3)
    assert torch.allclose(out[1], 2 * expected, rtol=1e-10, atol=1e-12)


def test_auto_matches_oracle():
    model, x1, x2 = make("two_inputs")
    _assert_close(torchntk.ntk(model, x1, x2), oracle_ntk(model, x1, x2), torch.float64)


def test_auto_follows_table_1(caplog):
    """Many outputs and one example: NTK-vector products; few outputs, many examples: Jacobian contraction."""
    import logging

    torchntk.ntk(torch.nn.Linear(2, 2), torch.randn(1, 2), implementation="ntk_vector_products")  # one-time import
    wide_out = torch.nn.Sequential(torch.nn.Linear(8, 64), torch.nn.Tanh(), torch.nn.Linear(64, 512))
    few_out = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    with caplog.at_level(logging.DEBUG, logger="torchntk"):
        torchntk.ntk(wide_out, torch.randn(1, 8))
        assert "auto picked ntk_vector_products" in caplog.text
        caplog.clear()
        torchntk.ntk(few_out, torch.randn(32, 8))
        assert "auto picked jacobian_contraction" in caplog.text


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method", METHODS)
def test_cuda_device_preserved(method):
    model, x1, x2 = make("mlp", dtype=torch.float32)
    model = model.cuda()
    kernel = torchntk.ntk(model, tuple(x.cuda() for x in x1), tuple(x.cuda() for x in x2), implementation=method)
    assert kernel.device.type == "cuda"
    _assert_close(kernel.cpu(), oracle_ntk(model.cpu(), x1, x2), torch.float32)


def test_jacobian_contraction_builds_each_jacobian_once_for_x2_none(monkeypatch):
    """x2=None: a diagonal tile reuses its Jacobians, an off-diagonal pair builds both sides once."""
    import importlib

    jc = importlib.import_module("torchntk.torch_native.jacobian_contraction")  # the module, not the function
    calls = []
    original = jc.batch_jacobians
    monkeypatch.setattr(
        jc,
        "batch_jacobians",
        lambda problem, inputs, **options: calls.append(len(inputs[0])) or original(problem, inputs, **options),
    )
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2)).double()
    x = torch.randn(4, 3, dtype=torch.float64)
    kernel = torchntk.ntk(model, x, implementation="jacobian_contraction")
    assert calls == [4]
    calls.clear()
    tiled = torchntk.ntk(model, x, implementation="jacobian_contraction", chunk_size=2)
    assert calls == [2, 2, 2]  # rows 0-1 (diagonal, then with columns 2-3), rows 2-3 (diagonal)
    assert torch.allclose(kernel, tiled, rtol=1e-12, atol=1e-14)


class _LinalgHead(torch.nn.Module):
    """A 2×2 matrix per example from a Linear, then a torch.linalg op."""

    def __init__(self, op: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin, self.op = torch.nn.Linear(3, 4), op

    def forward(self, x):
        a = self.lin(x).reshape(-1, 2, 2) + 3 * torch.eye(2, dtype=x.dtype)
        if self.op == "det":
            return torch.linalg.det(a)[:, None]
        if self.op == "slogdet":
            return torch.linalg.slogdet(a).logabsdet[:, None]
        if self.op == "logdet":
            return torch.logdet(a @ a.transpose(-1, -2))[:, None]
        return torch.linalg.solve(a, torch.ones(2, dtype=x.dtype).expand(a.shape[0], 2))


@pytest.mark.parametrize("op", ["det", "slogdet", "logdet", "solve"])
def test_linalg_ops_in_the_model(op):
    """vmap(jacrev(f)) is wrong under torch.no_grad for these ops (torch's bug): the torch-native methods, which ran
    under no_grad, returned kernels 0.9-244 off, and auto with them. They run in grad mode now."""
    model = _LinalgHead(op).double()
    x = torch.randn(4, 3, dtype=torch.float64)
    want = oracle_ntk(model, (x,), None)
    for method in ("jacobian_contraction", "ntk_vector_products", "auto"):
        torch.testing.assert_close(torchntk.ntk(model, x, implementation=method), want, rtol=1e-10, atol=1e-12)


class _StatUnderNoGrad(torch.nn.Module):
    """A scale computed under torch.no_grad in forward: reverse mode stops there, forward mode did not."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        with torch.no_grad():  # in __init__: not the forward's code
            self.l1, self.l2 = torch.nn.Linear(3, 4), torch.nn.Linear(4, 2)

    def forward(self, x):
        h = torch.tanh(self.l1(x))
        with torch.no_grad():
            scale = h.pow(2).sum(-1, keepdim=True)
        return self.l2(h) * scale


class _Detached(_StatUnderNoGrad):
    def forward(self, x):
        h = torch.tanh(self.l1(x))
        return self.l2(h) * h.detach().pow(2).sum(-1, keepdim=True)


def test_grad_mode_switched_in_forward():
    """NTK-vector products (forward mode) computed through torch.no_grad (0.15 off, asymmetric), and auto returned
    that when only they fitted: refused now; .detach() works in every method; the others follow torch."""
    from torchntk.torch_native._errors import UnsupportedModelError

    x = torch.randn(4, 3, dtype=torch.float64)
    model = _StatUnderNoGrad().double()
    want = oracle_ntk(model, (x,), None)
    with pytest.raises(UnsupportedModelError, match=r"modules \['_StatUnderNoGrad'\] may switch grad mode"):
        torchntk.ntk(model, x, implementation="ntk_vector_products")
    with pytest.raises(UnsupportedModelError, match="may switch grad mode"):
        torchntk.ntk_vp(model, x, None, torch.ones(4, 2, dtype=torch.float64))
    for method in ("jacobian_contraction", "auto"):
        torch.testing.assert_close(torchntk.ntk(model, x, implementation=method), want, rtol=1e-10, atol=1e-12)
    detached = _Detached().double()
    for method in ("jacobian_contraction", "ntk_vector_products", "auto"):
        got = torchntk.ntk(detached, x, implementation=method)
        torch.testing.assert_close(got, oracle_ntk(detached, (x,), None), rtol=1e-10, atol=1e-12)
