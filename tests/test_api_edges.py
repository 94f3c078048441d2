"""The public API at its edges: what hostile probing of stop 29 found (a buffer differentiated as a parameter, crashes
and misleading refusals), each against the float64 explicit-Jacobian oracle or the message that names the fix."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from _oracle import full_jacobian, oracle_ntk
from torch import nn

import torchntk
from torchntk.torch_native._errors import UnsupportedModelError

TORCH_NATIVE = ("jacobian_contraction", "ntk_vector_products")


class ScaledNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.l1, self.l2 = nn.Linear(3, 4), nn.Linear(4, 2)
        self.register_buffer("out_scale", torch.tensor([1.0, 3.0]))

    def forward(self, x):
        return self.l2(torch.tanh(self.l1(x))) * self.out_scale


def _x(n: int = 4, d: int = 3) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


@pytest.mark.parametrize("method", [*TORCH_NATIVE, "structured_derivatives", "auto"])
def test_a_state_dict_as_params_is_refused_and_its_parameters_taken(method, private_cache):
    """A buffer in the params dict was differentiated as a parameter by the torch-native methods (0.14 off the
    parameters' NTK at the checkpoint's values); structured derivatives refused it."""
    model = ScaledNet().double().eval()
    checkpoint = copy.deepcopy(model)
    with torch.no_grad():
        for p in checkpoint.parameters():
            p.add_(0.5)
    x, state = _x(), checkpoint.state_dict()
    with pytest.raises(ValueError, match=r"params holds buffers \['out_scale'\].*make it an nn.Parameter"):
        torchntk.ntk(model, x, params=dict(state), implementation=method)
    parameters = {k: v for k, v in state.items() if k in dict(model.named_parameters())}  # the message's fix
    got = torchntk.ntk(model, x, params=parameters, implementation=method)
    torch.testing.assert_close(got, oracle_ntk(checkpoint, (x,), None), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("method", TORCH_NATIVE)
def test_an_expanded_parameter_value_is_computed(method):
    """Stride-0 values: forward mode's dual tensors could not be made of them (torch's raw RuntimeError)."""
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double().eval()
    value = torch.randn(1, 3, dtype=torch.float64).expand(4, 3)
    x = _x()
    got = torchntk.ntk(model, x, params={"0.weight": value}, implementation=method)
    with torch.no_grad():
        model[0].weight.copy_(value)
    torch.testing.assert_close(got, oracle_ntk(model, (x,), None, names=["0.weight"]), rtol=1e-10, atol=1e-12)
    assert value.stride() == (0, 1)  # the caller's view stays a view


def test_a_full_backward_hook_is_taken_by_torchs_backward():
    """Refused by both torch-native methods before: Jacobian contraction now takes it by torch's backward (hook
    included); NTK-vector products, whose forward mode cannot, names it and the method that can."""
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double().eval()
    handle = model[2].register_full_backward_hook(lambda module, grad_in, grad_out: None)
    try:
        got = torchntk.ntk(model, _x(), implementation="jacobian_contraction")
        torch.testing.assert_close(got, oracle_ntk(model, (_x(),), None), rtol=1e-10, atol=1e-12)
    finally:
        handle.remove()


class SqrtOfSquare(nn.Module):
    """``sqrt(h**2)``: torch's derivative at an all-zero example is NaN, by torch.func and by the backward alike."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(3, 2, bias=False)

    def forward(self, x):
        return torch.sqrt(self.lin(x) ** 2)


@pytest.mark.parametrize("method", TORCH_NATIVE)
@pytest.mark.parametrize("zero_at", [0, 3])
def test_a_nan_derivative_is_not_blamed_on_torch_func(method, zero_at):
    """A NaN in both the torch.func and the backward Jacobian made the check's error NaN: "disagrees with
    torch.autograd's backward ... torch.cdist is one" at example 0, a NaN kernel at example 3."""
    model, x = SqrtOfSquare().double().eval(), _x()
    x[zero_at] = 0.0
    got = torchntk.ntk(model, x, implementation=method)
    # per example: a batched backward spreads one example's 0·inf = NaN over every example's rows
    names = [n for n, _ in model.named_parameters()]
    jacobians = torch.cat([full_jacobian(model, names, (x[i : i + 1],)) for i in range(len(x))])
    want = torch.einsum("aip,bjp->abij", jacobians, jacobians)
    assert torch.equal(got.isnan(), want.isnan()) and want.isnan().any() and not want.isnan().all()
    torch.testing.assert_close(got.nan_to_num(), want.nan_to_num(), rtol=1e-10, atol=1e-12)


class ChannelsLastInside(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(2, 3, 3)

    def forward(self, x):
        return self.conv(x.contiguous(memory_format=torch.channels_last)).flatten(1)


@pytest.mark.parametrize("method", TORCH_NATIVE)
def test_a_memory_format_inside_forward_is_named(method):
    model = ChannelsLastInside().double().eval()
    with pytest.raises(UnsupportedModelError, match="memory format.*structured_derivatives"):
        torchntk.ntk(model, torch.randn(2, 2, 5, 5, dtype=torch.float64), implementation=method)


class WithCounter(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.k = nn.Parameter(torch.tensor(3), requires_grad=False)

    def forward(self, x):
        return self.lin(x) * self.k


@pytest.mark.parametrize("params", [["k", "lin.weight"], ["lin.weight", "k"], lambda n, p: True])
def test_an_integer_parameter_selected_is_refused_with_the_fix(params):
    model = WithCounter().double().eval()
    with pytest.raises(TypeError, match=r"\['k \(torch.int64\)'\] are not floating point.*Leave them out"):
        torchntk.ntk(model, _x(), params=params, implementation="jacobian_contraction")


class Float64Head(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body, self.head = nn.Linear(3, 4), nn.Linear(4, 2).double()

    def forward(self, x):
        return self.head(torch.tanh(self.body(x)).double())


@pytest.mark.parametrize("method", TORCH_NATIVE)
def test_a_float64_head_selected_over_a_float32_body_takes_float32_inputs(method):
    """The inputs' dtype was compared with the first selected parameter's: refused, with a fix breaking the body."""
    model, x = Float64Head().eval(), _x().float()
    names = ["head.weight", "head.bias"]
    got = torchntk.ntk(model, x, params=names, implementation=method)
    torch.testing.assert_close(got, oracle_ntk(model, (x,), None, names=names), rtol=1e-10, atol=1e-12)
    with pytest.raises(TypeError, match="input 0 is torch.float16 but the model's weights are torch.float32"):
        torchntk.ntk(model, x.half(), params=names, implementation=method)


@pytest.mark.parametrize("axes", [np.int64(1), torch.tensor(1), (np.int64(1),), torch.tensor([1])])
def test_numpy_and_tensor_integers_are_axes(axes):
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Unflatten(1, (2, 3))).double().eval()
    x = _x()
    want = oracle_ntk(model, (x,), None, trace_axes=(1,))
    torch.testing.assert_close(torchntk.ntk(model, x, trace_axes=axes), want, rtol=1e-10, atol=1e-12)
    with pytest.raises(TypeError, match="trace_axes must hold integers, got True"):
        torchntk.ntk(model, x, trace_axes=(True,))


def test_inputs_as_a_dict_or_on_meta_are_named_with_the_fix():
    model = nn.Linear(3, 2).double()
    with pytest.raises(TypeError, match="x1 is a dict; pass a tensor"):
        torchntk.ntk(model, {"x": _x()})
    with pytest.raises(ValueError, match="meta device, which holds shapes but no values"):
        torchntk.ntk(nn.Linear(3, 2, device="meta"), torch.empty(4, 3, device="meta"))


def test_max_memory_as_a_whole_float_is_taken():
    model, x = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double().eval(), _x()
    got = torchntk.ntk(model, x, max_memory=3e9, implementation="ntk_vector_products")
    torch.testing.assert_close(got, oracle_ntk(model, (x,), None), rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="max_memory must be a positive integer"):
        torchntk.ntk(model, x, max_memory=2.5)
