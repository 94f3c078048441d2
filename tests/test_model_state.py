"""What a forward may not change, and what torchntk puts back (``_module_state``, ``_probe``), and torch.func's
derivatives checked against torch's backward (``torch_native._autograd_check``).

Hostile probing found each of these returning a wrong kernel, or changing the caller's model or tensors, silently."""

from __future__ import annotations

import functools
import io
import types

import pytest
import torch
from _oracle import oracle_ntk
from torch import nn

import torchntk
from torchntk.torch_native._errors import UnsupportedModelError

METHODS = ("jacobian_contraction", "ntk_vector_products", "structured_derivatives", "auto")


class WritesIntoLaterRows(nn.Module):
    """``x[x > 1] *= 2``: the probe's first examples are ≤ 1, so their values stay; the caller's x1 changed and
    tiles compounded (x8, x16) before."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 2)

    def forward(self, x):
        x.mul_(torch.where(x > 1, 2.0, 1.0))
        return torch.tanh(self.lin(x))


@pytest.mark.parametrize("method", METHODS)
def test_a_write_into_the_input_is_refused_before_it_changes_the_callers_tensor(method, private_cache):
    model = WritesIntoLaterRows().double().eval()
    x = torch.tensor([[0.5, 0.2], [0.1, -0.3], [2.0, 3.0]], dtype=torch.float64)
    kept = x.clone()
    with pytest.raises(ValueError, match="writes into its input 0 in place"):
        torchntk.ntk(model, x, implementation=method, chunk_size=1 if method != "auto" else None)
    assert torch.equal(x, kept)


class ActNorm(nn.Module):
    """Glow's data-dependent initialisation through ``.data`` (no version counter moves) and a Python flag."""

    def __init__(self) -> None:
        super().__init__()
        self.lin, self.bias = nn.Linear(3, 2), nn.Parameter(torch.zeros(2))
        self.initialized = False

    def forward(self, x):
        h = self.lin(x)
        if not self.initialized:
            self.bias.data.copy_(-h.mean(0))
            self.initialized = True
        return h + self.bias


@pytest.mark.parametrize("method", METHODS)
def test_a_data_dependent_initialisation_is_refused_and_the_model_left_as_it_was(method, private_cache):
    model = ActNorm().double().eval()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x = torch.randn(4, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="writes into its own state|changes its own attributes"):
        torchntk.ntk(model, x, implementation=method)
    assert model.initialized is False
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name
    model(x)  # initialised by the user: then its NTK is that of a fixed function
    torch.testing.assert_close(
        torchntk.ntk(model, x, implementation=method), oracle_ntk(model, (x,), None), rtol=1e-10, atol=1e-12
    )


class LazyCache(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin, self._w = nn.Linear(3, 3), None

    def forward(self, x):
        if self._w is None:
            self._w = self.lin.weight * 2
        return torch.tanh(x @ self._w.T)


class NoCache(nn.Module):
    """LazyCache's function, computed afresh on every forward."""

    def __init__(self, lin: nn.Linear) -> None:
        super().__init__()
        self.lin = lin

    def forward(self, x):
        return torch.tanh(x @ (self.lin.weight * 2).T)


class TiedView(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Linear(3, 3)
        self.dec_w = self.enc.weight[:]  # a view with a graph back to the parameter

    def forward(self, x):
        return torch.tanh(self.enc(x)) @ self.dec_w


@pytest.mark.parametrize("method", METHODS)
def test_a_cache_filled_in_forward_is_recomputed_on_each_and_left_empty(method, private_cache):
    """Each forward starts from the attributes as the caller left them: the cache follows the swapped weights."""
    model, x = LazyCache().double().eval(), torch.randn(3, 3, dtype=torch.float64)
    want = oracle_ntk(NoCache(model.lin), (x,), None)  # (the oracle's own copy would keep its first cache)
    torch.testing.assert_close(torchntk.ntk(model, x, implementation=method), want, rtol=1e-10, atol=1e-12)
    assert model._w is None  # the user's training would otherwise lose the weight's gradient


@pytest.mark.parametrize("method", METHODS)
def test_tensors_derived_from_parameters_outside_forward_are_refused(method, private_cache):
    x = torch.randn(3, 3)  # float32: .double() does not reach the tensors these modules hold
    warm = LazyCache().eval()
    warm(x)  # filled before the call: no forward recomputes it
    with pytest.raises(ValueError, match="computed from its parameters, or references to them"):
        torchntk.ntk(warm, x, implementation=method)
    torch.manual_seed(0)
    with pytest.raises(ValueError, match="computed from its parameters, or references to them"):
        torchntk.ntk(TiedView().eval(), x, implementation=method)


@pytest.mark.parametrize("method", ["jacobian_contraction", "structured_derivatives", "auto"])
def test_old_weight_norm_is_right_and_left_usable(method, private_cache):
    """(NTK-vector products refuse it: torch has no forward mode for the weight norm.)"""
    torch.manual_seed(0)
    with pytest.warns(FutureWarning):
        normed = nn.utils.weight_norm(nn.Linear(3, 4).double())
    model = nn.Sequential(normed, nn.Tanh(), nn.Linear(4, 2).double()).eval()
    # the oracle deep-copies its model, which the old weight norm forbids: the same function by the new one
    same = nn.utils.parametrizations.weight_norm(nn.Linear(3, 4).double())
    with torch.no_grad():
        same.parametrizations.weight.original0.copy_(normed.weight_g)
        same.parametrizations.weight.original1.copy_(normed.weight_v)
        same.bias.copy_(normed.bias)
    twin = nn.Sequential(same, nn.Tanh(), model[2]).eval()
    x = torch.randn(3, 3, dtype=torch.float64)
    torch.testing.assert_close(
        torchntk.ntk(model, x, implementation=method), oracle_ntk(twin, (x,), None), rtol=1e-10, atol=1e-12
    )
    weight = model[0].weight  # the hook's last assignment: put back, not torch.func's wrapped tensor
    torch.save(weight, io.BytesIO())
    weight.sum().backward()
    assert model[0].weight_v.grad is not None


class Centered(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, x):
        return torch.tanh(self.lin(x - x.mean(0)))


def test_coupling_is_found_past_equal_first_examples(private_cache):
    x = torch.randn(4, 3, dtype=torch.float64)
    x[1] = x[0]
    with pytest.raises(ValueError, match="examples are coupled"):
        torchntk.ntk(Centered().double().eval(), x)
    bn = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, track_running_stats=False), nn.Linear(4, 2)).eval()
    with pytest.raises(ValueError, match="without running statistics"):
        torchntk.ntk(bn.double(), x)


class CoupledBesideALargeHead(nn.Module):
    """A regression head of scale 2000 beside a small output coupled through the batch mean."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, x):
        h = self.lin(x)
        return torch.stack([2000 * torch.tanh(h[:, 0]), torch.tanh(h[:, 1] - h[:, 1].mean())], dim=1)


def test_coupling_is_judged_per_output(private_cache):
    with pytest.raises(ValueError, match="examples are coupled"):
        torchntk.ntk(CoupledBesideALargeHead().eval(), torch.randn(4, 3))


class CDist(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin, self.centers = nn.Linear(3, 6), nn.Parameter(torch.randn(2, 3))

    def forward(self, x):
        h = self.lin(x).reshape(x.shape[0], 2, 3)
        return torch.cdist(h, self.centers.expand(x.shape[0], 2, 3)).reshape(x.shape[0], -1)


class TiedQuantile(nn.Module):
    """torch.quantile over exactly tied hidden units: torch.func's jacrev (and jvp) disagree with the backward."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin, self.head = nn.Linear(4, 6), nn.Linear(1, 2)
        with torch.no_grad():
            self.lin.weight[1], self.lin.bias[1] = self.lin.weight[0], self.lin.bias[0]

    def forward(self, x):
        return self.head(torch.quantile(self.lin(x), 0.5, dim=1, keepdim=True))


@pytest.mark.parametrize("model_class", [CDist, TiedQuantile])
def test_a_wrong_torch_func_derivative_falls_back_to_autograd(model_class, private_cache):
    """torch.func's jacrev of torch.cdist is wrong (torch's bug): Jacobian contraction and auto were 1.39 off, then
    refused, as every method did; their Jacobians are now torch.autograd's, output by output (found by probing)."""
    model, x = model_class().double().eval(), torch.randn(4, model_class().lin.in_features, dtype=torch.float64)
    want = oracle_ntk(model, (x,), None)
    for method in ("jacobian_contraction", "auto"):
        torch.testing.assert_close(torchntk.ntk(model, x, implementation=method), want, rtol=1e-10, atol=1e-12)


class PReLUAtZero(nn.Module):
    """Forward mode takes PReLU's derivative at 0 as 1, its backward as the slope (the NTK's J is the backward's)."""

    def __init__(self) -> None:
        super().__init__()
        self.first, self.act, self.last = nn.Linear(2, 2), nn.PReLU(init=0.3), nn.Linear(2, 2)
        with torch.no_grad():
            self.first.weight.copy_(torch.eye(2))
            self.first.bias.zero_()

    def forward(self, x):
        return self.last(self.act(self.first(x)))


def test_forward_mode_off_the_backward_is_refused_by_ntk_vector_products(private_cache):
    model = PReLUAtZero().double().eval()
    x = torch.tensor([[0.0, 0.0], [0.5, -0.7]], dtype=torch.float64)
    with pytest.raises(UnsupportedModelError, match="forward-mode derivative"):
        torchntk.ntk(model, x, implementation="ntk_vector_products")
    want = oracle_ntk(model, (x,), None)
    torch.testing.assert_close(torchntk.ntk(model, x, implementation="auto"), want, rtol=1e-10, atol=1e-12)


class HoldsInAList(nn.Module):
    def __init__(self, derived: bool) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.ws = [self.lin.weight * 2] if derived else [self.lin.weight]

    def forward(self, x):
        return torch.tanh(x @ self.ws[0].T)


class DerivedBuffer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.register_buffer("w2", self.lin.weight * 2)

    def forward(self, x):
        return torch.tanh(self.lin(x) + x @ self.w2.T)


@pytest.mark.parametrize("model", [HoldsInAList(True), HoldsInAList(False), DerivedBuffer()], ids=str)
def test_references_the_swap_cannot_reach_are_refused(model, private_cache):
    with pytest.raises(ValueError, match="computed from its parameters, or references to them"):
        torchntk.ntk(model.eval(), torch.randn(3, 3), implementation="jacobian_contraction")


def test_inside_parametrize_cached_is_refused():
    from torch.nn.utils import parametrize

    class Doubled(nn.Module):
        def forward(self, w):
            return 2 * w

    model = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 2))
    parametrize.register_parametrization(model[0], "weight", Doubled())
    x = torch.randn(3, 3)
    with parametrize.cached(), pytest.raises(ValueError, match="parametrize.cached"):
        torchntk.ntk(model, x)
    torchntk.ntk(model, x)  # outside it: fine


class Logs(nn.Module):
    """Attributes a forward sets for inspection: they do not change its function and are left as they were."""

    def __init__(self) -> None:
        super().__init__()
        self.lin, self.last, self.shape, self.calls, self.stats = nn.Linear(3, 3), None, None, 0, {}

    def forward(self, x):
        h = torch.tanh(self.lin(x))
        self.last, self.shape, self.calls = h, x.shape, self.calls + 1
        self.stats["h"] = h
        return h


@pytest.mark.parametrize("method", METHODS)
def test_attributes_a_forward_logs_are_put_back(method, private_cache):
    model, x = Logs().double().eval(), torch.randn(3, 3, dtype=torch.float64)
    want = oracle_ntk(model, (x,), None)
    model.last, model.shape, model.calls, model.stats = None, None, 0, {}
    torch.testing.assert_close(torchntk.ntk(model, x, implementation=method), want, rtol=1e-10, atol=1e-12)
    assert (model.last, model.shape, model.calls, model.stats) == (None, None, 0, {})


class ScalesItsAttribute(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin, self.scale = nn.Linear(3, 2), torch.ones(())

    def forward(self, x):
        self.scale.mul_(1.5)
        return self.lin(x) * self.scale


def test_a_write_into_a_tensor_attribute_is_refused_and_leaves_it_as_it_was():
    model = ScalesItsAttribute().eval()
    with pytest.raises(ValueError, match="writes into its own state in place"):
        torchntk.ntk(model, torch.randn(3, 3))
    assert float(model.scale) == 1.0


class _Settings:
    """A plain object a module holds (a config of the user's own class)."""

    def __init__(self) -> None:
        self.scale = torch.ones(2, dtype=torch.float64)


OFFSET = torch.full((2,), 0.25, dtype=torch.float64)  # a module global a forward reads (and, below, writes)


class HeldElsewhere(nn.Module):
    """Tensors outside the module's attributes: in a plain object, on the class, in a module global."""

    GAIN = torch.full((2,), 2.0, dtype=torch.float64)

    def __init__(self, write: str = "") -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin, self.settings, self.write = nn.Linear(3, 2).double(), _Settings(), write

    def forward(self, x):
        held = {"settings": self.settings.scale, "class": HeldElsewhere.GAIN, "global": OFFSET}
        if self.write:
            held[self.write].mul_(1.5)
        return torch.tanh(self.lin(x) * self.settings.scale * HeldElsewhere.GAIN + OFFSET)


@pytest.mark.parametrize(
    "where, named", [("settings", "settings.scale"), ("class", "HeldElsewhere.GAIN"), ("global", "the global OFFSET")]
)
def test_a_write_into_a_tensor_held_outside_the_module_is_refused_and_undone(where, named):
    """Stop 29: the probe copied module attributes only; these were written in the caller's objects (and refused as
    "random", the outputs moving between forwards), and a forward writing only on later examples compounded."""
    model = HeldElsewhere(write=where).eval()
    kept = {"settings": model.settings.scale.clone(), "class": HeldElsewhere.GAIN.clone(), "global": OFFSET.clone()}
    for method in ("jacobian_contraction", "ntk_vector_products"):
        with pytest.raises(ValueError, match=f"writes into its own state in place \\({named}"):
            torchntk.ntk(model, torch.randn(3, 3, dtype=torch.float64), implementation=method)
    now = {"settings": model.settings.scale, "class": HeldElsewhere.GAIN, "global": OFFSET}
    assert all(torch.equal(now[k], kept[k]) for k in kept)
    assert now["settings"] is model.settings.scale and HeldElsewhere.__dict__["GAIN"] is now["class"]


def test_tensors_held_outside_the_module_and_only_read_are_used_as_they_are():
    model, x = HeldElsewhere().eval(), torch.randn(4, 3, dtype=torch.float64)
    want = oracle_ntk(model, (x,), None)
    for method in ("jacobian_contraction", "ntk_vector_products"):
        torch.testing.assert_close(torchntk.ntk(model, x, implementation=method), want, rtol=1e-10, atol=1e-12)


class EmptyTensorCache(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin, self._w = nn.Linear(3, 3), torch.zeros(0)

    def forward(self, x):
        if self._w.numel() == 0:
            self._w = self.lin.weight * 2
        return torch.tanh(x @ self._w.T)


def test_a_cache_starting_as_an_empty_tensor_follows_the_swapped_weights(private_cache):
    model, x = EmptyTensorCache().double().eval(), torch.randn(3, 3, dtype=torch.float64)
    want = oracle_ntk(NoCache(model.lin), (x,), None)
    for method in METHODS:
        got = torchntk.ntk(model, x, implementation=method)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12, msg=method)
    v = torch.randn(3, 3, dtype=torch.float64)
    want_vp = torch.einsum("nmab,mb->na", want, v)
    torch.testing.assert_close(torchntk.ntk_vp(model, x, x, v), want_vp, rtol=1e-10, atol=1e-12)


def test_a_float32_body_under_a_float64_head_is_not_refused():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).eval()
    model[2].double()

    class Head(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = model

        def forward(self, x):
            return self.body[2](self.body[1](self.body[0](x)).double())

    wrapped, x = Head().eval(), torch.randn(4, 3)
    reference = torchntk.ntk(wrapped, x, implementation="jacobian_contraction")
    got = torchntk.ntk(wrapped, x, implementation="ntk_vector_products")
    torch.testing.assert_close(got, reference, rtol=1e-5, atol=1e-6)


def test_coupling_is_found_past_leading_duplicates():
    x = torch.randn(200, 3, dtype=torch.float64)
    x[:100] = x[0]
    with pytest.raises(ValueError, match="examples are coupled"):
        torchntk.ntk(Centered().double().eval(), x, trace_axes=(-1,), implementation="jacobian_contraction")


class Checkpointed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.o = nn.Linear(3, 3), nn.Linear(3, 2)

    def forward(self, x):
        return self.o(torch.utils.checkpoint.checkpoint(lambda t: torch.tanh(self.a(t)), x, use_reentrant=False))


def test_activation_checkpointing_is_computed(private_cache):
    """torch.func does not support saved-tensor hooks: the raw error pointed at torch, not at the checkpoint, then
    both torch-native methods refused; Jacobian contraction now takes it by torch's backward (and NTK-vector
    products, whose Jacobian rows are Jacobian contraction's), auto without falling back."""
    model, x = Checkpointed().double().eval(), torch.randn(3, 3, dtype=torch.float64)
    want = oracle_ntk(model, (x,), None)
    for method in ("jacobian_contraction", "ntk_vector_products", "auto"):
        got = torchntk.ntk(model, x, implementation=method)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_a_tensor_held_in_several_places_is_copied_once(monkeypatch):
    """Six references to one 80 MB table took six copies during the probe; the copies also stay one tensor."""
    from torchntk._module_state import tensor_attributes_copied

    model = HeldElsewhere().eval()
    table = torch.ones(5)
    model.first, model.again, model.settings.table = table, [table], table
    with tensor_attributes_copied(model) as copies:
        assert model.first is model.again[0] is model.settings.table and model.first is not table
        assert {id(copies[name]) for name in ("first", "again[0]", "settings.table")} == {id(model.first)}
    assert model.first is table and model.again[0] is table


def test_a_users_package_named_like_a_standard_module_is_hashed_as_code(monkeypatch, tmp_path):
    """``is_library`` took every standard-library name as versioned code: a user's ``code/`` package edited between
    two processes served the old model's tiles (0.46 off)."""
    import sys
    import types

    from torchntk._fingerprint import is_library

    users = types.ModuleType("code")
    users.__file__ = str(tmp_path / "code" / "__init__.py")
    monkeypatch.setitem(sys.modules, "code", users)
    assert not is_library("code.mymodel") and is_library("json") and is_library("torch.nn")


def _held_deeper(kind: str) -> nn.Module:
    """A reference to ``lin.weight`` one level deeper than the first check looked (stop 29, second round: the
    kernel missed that path, 0.13-0.47 off)."""
    model = NoCache(nn.Linear(3, 3))
    weight = model.lin.weight
    holders = {
        "object in a list": lambda: [types.SimpleNamespace(w=weight)],
        "dict of lists": lambda: {"a": [weight]},
        "closure": lambda: lambda: weight,
        "partial": lambda: functools.partial(torch.matmul, other=weight.T),
    }
    model.held = holders[kind]()
    return model


@pytest.mark.parametrize("kind", ["object in a list", "dict of lists", "closure", "partial"])
def test_a_parameter_held_deeper_is_refused(kind):
    model = _held_deeper(kind).double().eval()
    with pytest.raises(ValueError, match="references to them, outside its registered parameters"):
        torchntk.ntk(model, torch.randn(3, 3, dtype=torch.float64), implementation="jacobian_contraction")


class WritesDeeper(nn.Module):
    """Writes into a tensor held in a dict of lists: the caller's tensor changed (1 -> 7), refused as "random"."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin, self.state = nn.Linear(3, 3).double(), {"a": [torch.ones(3, dtype=torch.float64)]}

    def forward(self, x):
        self.state["a"][0].add_(1.0)
        return self.lin(x) * self.state["a"][0]


def test_a_write_into_a_tensor_held_deeper_is_refused_and_undone():
    model = WritesDeeper().eval()
    held = model.state["a"][0]
    with pytest.raises(ValueError, match=r"writes into its own state in place \(state\['a'\]\[0\]"):
        torchntk.ntk(model, torch.randn(3, 3, dtype=torch.float64), implementation="jacobian_contraction")
    assert model.state["a"][0] is held and torch.equal(held, torch.ones(3, dtype=torch.float64))


HELPER_SCALE = torch.full((2,), 0.5, dtype=torch.float64)  # read (and written) by a helper, not by forward
user_helpers = types.ModuleType("user_helpers")  # a user's own module of constants
user_helpers.TABLE = torch.full((2,), 1.25, dtype=torch.float64)


def _scaled(h, write):
    if write == "helper global":
        HELPER_SCALE.mul_(1.5)
    return h * HELPER_SCALE


def _shifted(h, write, shift=torch.full((2,), 0.1, dtype=torch.float64)):  # noqa: B008 (a default tensor)
    if write == "default argument":
        shift.add_(1.0)
    if write == "module attribute":
        user_helpers.TABLE.mul_(2.0)
    return _scaled(h, write) + shift * user_helpers.TABLE


class HelperReads(nn.Module):
    """Tensors only the helper functions its forward calls read: a global, another module's attribute, a default."""

    def __init__(self, write: str = "") -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin, self.write = nn.Linear(3, 2).double(), write

    def forward(self, x):
        return torch.tanh(_shifted(self.lin(x), self.write))


@pytest.mark.parametrize(
    "write, named",
    [
        ("helper global", "the global HELPER_SCALE"),
        ("module attribute", "user_helpers.TABLE"),
        ("default argument", "a default argument of _shifted"),
    ],
)
def test_a_write_by_a_helper_function_is_refused_and_undone(write, named):
    """Stop 30: the probe copied only the globals the model's methods read; these three were written in the caller's
    objects before the refusal (and named "random")."""
    model = HelperReads(write).eval()
    kept = (HELPER_SCALE.clone(), user_helpers.TABLE.clone(), _shifted.__defaults__[0].clone())
    default = _shifted.__defaults__[0]
    for method in ("jacobian_contraction", "ntk_vector_products"):
        with pytest.raises(ValueError, match=f"writes into its own state in place \\({named}"):
            torchntk.ntk(model, torch.randn(3, 3, dtype=torch.float64), implementation=method)
    now = (HELPER_SCALE, user_helpers.TABLE, _shifted.__defaults__[0])
    assert all(torch.equal(a, b) for a, b in zip(now, kept, strict=True))
    assert _shifted.__defaults__[0] is default


def test_tensors_read_by_helpers_are_used_as_they_are():
    model, x = HelperReads().eval(), torch.randn(4, 3, dtype=torch.float64)
    want = oracle_ntk(model, (x,), None)
    for method in ("jacobian_contraction", "ntk_vector_products"):
        torch.testing.assert_close(torchntk.ntk(model, x, implementation=method), want, rtol=1e-10, atol=1e-12)
