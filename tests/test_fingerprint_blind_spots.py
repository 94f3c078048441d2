"""State a forward reads that is neither a parameter nor a plain attribute of a module in the tree: a helper
module's globals, modules kept in lists or dicts, the object behind a bound method, a config object, a library
class or function patched by the user. Each changed what the model computes without changing its fingerprint, and
structured derivatives (and auto) then served the old model's conversion: 6–98% off, silently (hostile probing).
Every change must change the fingerprint, and every implementation must then give the changed model's kernel."""

from __future__ import annotations

import functools
import os

import _fingerprint_helpers as helpers
import pytest
import torch
from _oracle import oracle_ntk
from torch import nn

import torchntk
from torchntk._fingerprint import architecture


class Scaler:
    def __init__(self, factor: float) -> None:
        self.factor = factor

    def apply(self, t):
        return t * self.factor


class Settings:
    __slots__ = ("cap",)

    def __init__(self, cap: float) -> None:
        self.cap = cap


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.first = nn.Linear(3, 4)
        self.last = nn.Linear(4, 2)
        self.side = [nn.Linear(4, 4)]  # outside the module tree: constants of the function
        self.table = {"mix": nn.Sequential(nn.Linear(4, 4), nn.Tanh())}
        self.post = Scaler(1.0).apply  # a bound method of a plain object
        self.settings = Settings(100.0)  # a config object (slots)
        self.act = nn.GELU()

    def double(self):  # and the modules outside the tree, which nn.Module.double does not reach
        self.side[0].double()
        self.table["mix"].double()
        return super().double()

    def forward(self, x):
        h = helpers.act(self.first(x))
        h = torch.tanh(self.side[0](h)) + self.table["mix"](h)
        return self.post(torch.clamp(self.last(self.act(h)), max=self.settings.cap))


def _gelu_doubled(self, x):
    return 2 * nn.functional.gelu(x)


_ORIGINAL_F_GELU = nn.functional.gelu


def _functional_gelu_doubled(input, approximate="none"):  # noqa: A002 - F.gelu's own argument name
    """Patched into torch.nn.functional, where only library code (nn.GELU.forward) reads it: a store served the
    unpatched model's tiles (stop 29)."""
    return 2 * _ORIGINAL_F_GELU(input, approximate=approximate)


def _changes():
    def side_weight(m):
        with torch.no_grad():
            m.side[0].weight.mul_(3.0)

    def side_replaced(m):
        m.side[0] = nn.Linear(4, 4, dtype=m.first.weight.dtype)

    def dict_bias(m):
        with torch.no_grad():
            m.table["mix"][0].bias.add_(1.0)

    def dict_activation(m):
        m.table["mix"][1] = nn.Sigmoid()

    def owner_state(m):
        m.post.__self__.factor = 5.0

    def settings(m):
        m.settings.cap = -10.0  # active on every example: its outputs have no derivative

    return {
        "helper module constant": (lambda m: setattr(helpers, "SCALE", 3.0), lambda: setattr(helpers, "SCALE", 1.0)),
        "helper module function": (
            lambda m: setattr(helpers, "act", torch.sigmoid),
            lambda: setattr(helpers, "act", _ORIGINAL_ACT),
        ),
        "weight of a module in a list": (side_weight, None),
        "module in a list replaced": (side_replaced, None),
        "bias of a module in a dict": (dict_bias, None),
        "activation inside a module in a dict": (dict_activation, None),
        "state of a bound method's object": (owner_state, None),
        "config object with slots": (settings, None),
        "library function read by a library class patched": (
            lambda m: setattr(nn.functional, "gelu", _functional_gelu_doubled),
            lambda: setattr(nn.functional, "gelu", _ORIGINAL_F_GELU),
        ),
        "library class patched": (
            lambda m: setattr(nn.GELU, "forward", _gelu_doubled),
            lambda: setattr(nn.GELU, "forward", _ORIGINAL_GELU_FORWARD),
        ),
    }


_ORIGINAL_ACT = helpers.act
_ORIGINAL_GELU_FORWARD = nn.GELU.forward
CHANGES = _changes()


@pytest.mark.parametrize("change", list(CHANGES))
def test_change_changes_the_fingerprint(change):
    model = Net()
    before = architecture(model)
    assert before.certain, before.uncertain
    apply, undo = CHANGES[change]
    try:
        apply(model)
        assert architecture(model).digest != before.digest
    finally:
        if undo:
            undo()
    assert architecture(Net()).digest == before.digest  # and nothing else does (a fresh model: the same)


@pytest.mark.parametrize("change", list(CHANGES))
def test_every_implementation_follows_the_change(change, private_cache):
    model = Net().double().eval()
    x = torch.randn(4, 3, dtype=torch.float64)
    x[0] = 0  # the clamp is inactive on example 0 for every cap: a check on it alone cannot tell
    methods = ("jacobian_contraction", "ntk_vector_products", "structured_derivatives", "auto")
    before = oracle_ntk(model, (x,), None)
    for method in methods:  # every cache filled with the model as it was
        torch.testing.assert_close(torchntk.ntk(model, x, implementation=method), before, rtol=1e-10, atol=1e-12)
    apply, undo = CHANGES[change]
    try:
        apply(model)
        want = oracle_ntk(model, (x,), None)
        assert not torch.allclose(want, before)  # the change changes the function
        for method in methods:
            torch.testing.assert_close(torchntk.ntk(model, x, implementation=method), want, rtol=1e-10, atol=1e-12)
    finally:
        if undo:
            undo()


class ScaledByEnvironment(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, x):
        return self.lin(x) * float(os.environ.get("TORCHNTK_TEST_SCALE", "1"))


def test_a_forward_reading_the_environment_is_uncertain(monkeypatch, private_cache):
    """Its value is the process's, not the model's: nothing keyed by its fingerprint may be reused."""
    model = ScaledByEnvironment().double()
    assert "reads the process's state (environ)" in " ".join(architecture(model).uncertain)
    x = torch.randn(3, 3, dtype=torch.float64)
    for scale in ("1", "3"):
        monkeypatch.setenv("TORCHNTK_TEST_SCALE", scale)
        got = torchntk.ntk(model, x, implementation="structured_derivatives")
        torch.testing.assert_close(got, oracle_ntk(model, (x,), None), rtol=1e-10, atol=1e-12)


class HoldsHelpers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin, self.settings = nn.Linear(3, 2), helpers  # a helper module held as an attribute

    def forward(self, x):
        return self.lin(x) * self.settings.SCALE


def test_a_helper_module_held_as_an_attribute(monkeypatch):
    """Only its name was recorded: a second process was served the conversion of the module's old constants."""
    model = HoldsHelpers()
    before = architecture(model)
    monkeypatch.setattr(helpers, "SCALE", 3.0)
    after = architecture(model)
    assert before.certain and after.certain and before.digest != after.digest


def _model_from_a_factory():
    """A model class defined in a function that imports its modules locally: the class's methods hold the modules
    in closure cells (benchmarks' ``ntk_mlp``)."""
    import _fingerprint_helpers as local_helpers
    import torch as local_torch

    class Factored(local_torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            local_torch.manual_seed(0)
            self.lin = local_torch.nn.Linear(3, 2)

        def forward(self, x):
            return local_helpers.act(local_torch.nn.functional.relu(self.lin(x))) * local_helpers.SCALE

    return Factored()


def test_modules_in_closure_cells_are_read_like_globals(monkeypatch):
    """A module in a closure cell was walked attribute by attribute (all of torch: 0.9 s, and uncertain through
    typing_extensions): the model was converted again on every call. Only what the code reads counts, as for a
    global module: certain, equal for equal models, and a change of the helper module's constant or function (or
    a user's function patched into torch where the code reads it) changes it."""
    before = architecture(_model_from_a_factory())
    assert before.certain, before.uncertain
    assert architecture(_model_from_a_factory()).digest == before.digest
    for name, value in (("SCALE", 3.0), ("act", torch.sigmoid)):
        with monkeypatch.context() as patch:
            patch.setattr(helpers, name, value)
            after = architecture(_model_from_a_factory())
            assert after.certain and after.digest != before.digest, name
    with monkeypatch.context() as patch:
        patch.setattr(torch.nn.functional, "relu", lambda t, inplace=False: torch.tanh(t))
        assert architecture(_model_from_a_factory()).digest != before.digest
    with monkeypatch.context() as patch:
        patch.setattr(torch.nn.functional, "gelu", lambda t, approximate="none": torch.tanh(t))  # not read
        assert architecture(_model_from_a_factory()).digest == before.digest


class _Dotted(nn.Module):
    """Reads torch.nn.functional.gelu down a dotted path, and a Tensor method."""

    def __init__(self) -> None:
        super().__init__()
        self.lin, self.act = nn.Linear(3, 3), nn.Tanh()

    def forward(self, x):
        return torch.nn.functional.gelu(self.act(self.lin(x))).sigmoid()


class _SteepTanh(torch.autograd.Function):
    @staticmethod
    def forward(x):
        return torch.special.expit(2 * x) * 2 - 1


def _wrapped_gelu():
    @functools.wraps(_ORIGINAL_F_GELU)  # copies torch's __module__: judged by where its code is
    def gelu(input, approximate="none"):  # noqa: A002
        return _ORIGINAL_F_GELU(input, approximate=approximate)

    return gelu


@pytest.mark.parametrize(
    "owner, name, patch",
    [
        (nn.functional, "gelu", _wrapped_gelu),
        (nn.functional, "gelu", lambda: functools.partial(_functional_gelu_doubled, approximate="none")),
        (torch, "tanh", lambda: _SteepTanh.apply),  # read by nn.Tanh.forward: a C method of the user's class
        (torch.Tensor, "sigmoid", lambda: lambda self: torch.special.expit(self)),
    ],
)
def test_patches_torch_hides_are_seen(owner, name, patch):
    """Stop 29's second round: each of these patches left a store serving the unpatched model's tiles (0.55-0.89)."""
    model = _Dotted()
    before = architecture(model).digest
    own = name in vars(owner)  # torch.Tensor inherits sigmoid from its C base: the patch is removed after
    original = vars(owner).get(name)
    try:
        setattr(owner, name, patch())
        assert architecture(model).digest != before
    finally:
        if own:
            setattr(owner, name, original)
        else:
            delattr(owner, name)
    assert architecture(model).digest == before
