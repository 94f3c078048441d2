"""Hooks the model's forward runs and the parameters they reach (found by hostile probing, every method silent).

- A forward hook or pre-hook reading the model's parameters through a global, a closure or a default argument (a
  LoRA adapter applied by a hook): the functional swap does not reach them, so they were constants (0.14 off; the
  kernel of ``params=["lora_A", "lora_B"]`` was zero). Refused by name, as attributes holding them are.
- A gradient hook on a parameter (``p.register_hook``, a pruning mask): torch's backward applies it, the
  functional J did not (0.08-0.7 off). Refused by name.
- A ``params`` predicate is asked of every name of a tied parameter (a list already matched any of them).
"""

from __future__ import annotations

import pytest
import torch
from _oracle import oracle_ntk
from torch import nn

import torchntk

METHODS = ("jacobian_contraction", "ntk_vector_products", "structured_derivatives", "auto")


def net() -> nn.Sequential:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double().eval()


LORA_A = nn.Parameter(0.3 * torch.randn(2, 6, dtype=torch.float64))
LORA_B = nn.Parameter(0.3 * torch.randn(8, 2, dtype=torch.float64))


def lora_through_globals(module, args, out):
    return out + args[0] @ LORA_A.T @ LORA_B.T


def with_hook(kind: str) -> nn.Module:
    model = net()
    if kind == "global":  # the adapter registered in the model, applied by a hook reading module globals
        model.lora_A, model.lora_B = LORA_A, LORA_B
        model[0].register_forward_hook(lora_through_globals)
    elif kind == "closure":
        a, b = nn.Parameter(LORA_A.detach().clone()), nn.Parameter(LORA_B.detach().clone())
        model.lora_A, model.lora_B = a, b
        model[0].register_forward_hook(lambda module, args, out: out + args[0] @ a.T @ b.T)
    else:  # a pre-hook holding a weight of the model as a default argument

        def pre(module, args, w=model[2].weight):
            return (args[0] + 0.1 * (args[0] @ w.T @ w),)

        model[2].register_forward_pre_hook(pre)
    return model


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind", ["global", "closure", "default"])
def test_a_hook_reaching_parameters_is_refused_by_name(kind, method, private_cache):
    model = with_hook(kind)
    x = torch.randn(3, 6, dtype=torch.float64)
    # the oracle's kernel is not the one of constant adapters: the refusal prevents a wrong answer
    with pytest.raises(ValueError, match=r"references to them.*hook"):
        torchntk.ntk(model, x, implementation=method)


def test_a_hook_reading_other_tensors_still_computes():
    model = net()
    shift = torch.linspace(-1, 1, 8, dtype=torch.float64)
    model[0].register_forward_hook(lambda module, args, out: out + shift)
    x = torch.randn(3, 6, dtype=torch.float64)
    for method in METHODS[:2]:
        got = torchntk.ntk(model, x, implementation=method)
        torch.testing.assert_close(got, oracle_ntk(model, (x,), None), atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("method", METHODS)
def test_a_gradient_hook_on_a_parameter_is_refused(method, private_cache):
    model = net()
    mask = (torch.rand(8, 6, generator=torch.Generator().manual_seed(0)) > 0.5).double()
    model[0].weight.register_hook(lambda g: g * mask)
    x = torch.randn(3, 6, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"\['0.weight'\] have gradient hooks.*prune"):
        torchntk.ntk(model, x, implementation=method)
    # left out of the selection, the hooked parameter does not matter
    got = torchntk.ntk(model, x, implementation=method, params=["2.weight", "2.bias"])
    torch.testing.assert_close(got, oracle_ntk(model, (x,), None, names=["2.weight", "2.bias"]), atol=1e-12, rtol=1e-10)


def test_a_predicate_sees_every_name_of_a_tied_parameter():
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    model[2].weight = model[0].weight  # tied: named_parameters() reports it as "0.weight" only
    x = torch.randn(3, 4, dtype=torch.float64)
    by_list = torchntk.ntk(model, x, params=["2.weight", "2.bias"], implementation="jacobian_contraction")
    by_predicate = torchntk.ntk(
        model, x, params=lambda name, p: name.startswith("2."), implementation="jacobian_contraction"
    )
    torch.testing.assert_close(by_predicate, by_list, atol=0, rtol=0)
    want = oracle_ntk(model, (x,), None, names=["0.weight", "2.bias"])
    torch.testing.assert_close(by_predicate, want, atol=1e-12, rtol=1e-10)
    only = torchntk.ntk(model, x, params=lambda name, p: name == "2.weight", implementation="jacobian_contraction")
    torch.testing.assert_close(only, oracle_ntk(model, (x,), None, names=["0.weight"]), atol=1e-12, rtol=1e-10)


class SlotsAdapter:
    """A callable without a ``__dict__`` holding the adapter's Parameters: no attribute walk finds them."""

    __slots__ = ("a", "b")

    def __init__(self, a: nn.Parameter, b: nn.Parameter) -> None:
        self.a, self.b = a, b

    def __call__(self, module, args, out):
        return out + args[0] @ self.a.T @ self.b.T


class UnregisteredAdapter(nn.Module):
    def __init__(self, a: nn.Parameter, b: nn.Parameter) -> None:
        super().__init__()
        self.a, self.b = a, b

    def hook(self, module, args, out):
        return out + args[0] @ self.a.T @ self.b.T


HELD = []  # a global list of Parameters read by the forward


class ReadsAGlobalList(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = net()

    def forward(self, x):
        return self.inner(x) + (x @ HELD[0].T).sum(-1, keepdim=True)


@pytest.mark.parametrize("kind", ["slots", "partial_of_method", "unregistered_module", "global_list"])
def test_any_path_past_the_swap_to_a_parameter_is_refused(kind, private_cache):
    """Found in a second probing round: paths the walks of attributes, closures and globals do not follow (0.12 off
    by every method). The probe's forward runs in grad mode with every parameter swapped for a copy that does not
    require grad: a graph reaching one of the model's Parameters names it, whatever the path."""
    import functools

    if kind == "global_list":
        model = ReadsAGlobalList().double()
        HELD[:] = [model.inner[0].weight]
    else:
        model = net()
        model.lora_A = nn.Parameter(LORA_A.detach().clone())
        model.lora_B = nn.Parameter(LORA_B.detach().clone())
        adapter = UnregisteredAdapter(model.lora_A, model.lora_B)
        hook = {
            "slots": SlotsAdapter(model.lora_A, model.lora_B),
            "partial_of_method": functools.partial(adapter.hook),
            "unregistered_module": adapter.hook,
        }[kind]
        model[0].register_forward_hook(hook)
    x = torch.randn(3, 6, dtype=torch.float64)
    for method in METHODS:
        with pytest.raises(ValueError, match="hook, helper object or closure that reads a Parameter"):
            torchntk.ntk(model, x, implementation=method)
    HELD.clear()


def test_a_frozen_parameter_read_through_a_helper_is_a_constant():
    """Found in a third probing round: a requires_grad=False Parameter held by a helper object was refused as a
    reference to the parameters; it is a constant wherever it is read, as the oracle's J has it."""

    class Holder:
        def __init__(self, p: nn.Parameter) -> None:
            self.p = p

    class Frozen(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = net()
            self.scale = nn.Parameter(torch.full((3,), 0.5, dtype=torch.float64), requires_grad=False)
            self.holder = Holder(self.scale)

        def forward(self, x):
            return self.body(x) * self.holder.p

    model, x = Frozen(), torch.randn(3, 6, dtype=torch.float64)
    for method in ("jacobian_contraction", "ntk_vector_products"):
        got = torchntk.ntk(model, x, implementation=method)
        torch.testing.assert_close(got, oracle_ntk(model, (x,), None), atol=1e-12, rtol=1e-10)
