"""Issue 14, classes 4-8: no crash, unstated assumptions checked, errors that point the right way, max_memory refused
before any conversion, and auto never failing where another method works. Kernels against the float64 oracle."""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from _oracle import oracle_ntk
from torch import Tensor, nn

import torchntk
import torchntk._api as api_module
from torchntk._auto import Estimate, Explanation
from torchntk._problem import prepare
from torchntk.torch_native._errors import UnsupportedModelError

NATIVE = ("jacobian_contraction", "ntk_vector_products")
ALL = ("auto", *NATIVE, "structured_derivatives")
D = torch.float64


def _x(*shape: int, seed: int = 0) -> Tensor:
    return torch.randn(*shape, dtype=D, generator=torch.Generator().manual_seed(seed))


def _close(kernel: Tensor, expected: Tensor) -> bool:
    return kernel.shape == expected.shape and torch.allclose(kernel, expected, rtol=1e-9, atol=1e-11)


class Head(nn.Module):
    """A linear layer followed by ``fn(self, h, x)``: one hostile forward per case."""

    def __init__(self, fn, din: int = 4, dout: int = 3) -> None:
        super().__init__()
        self.lin = nn.Linear(din, dout)
        self.fn = fn

    def forward(self, x: Tensor) -> Tensor:
        return self.fn(self, x)


def head(fn) -> nn.Module:
    torch.manual_seed(0)
    return Head(fn).double()


# --- 4. No crash -------------------------------------------------------------------------------------------------


_ZERO_OUTPUTS = """
import torch, torchntk, torchvision
model = torchvision.models.resnet18(weights=None, num_classes=0).eval()
x = torch.randn(2, 3, 32, 32)
for implementation in {implementations!r}:
    try:
        torchntk.ntk(model, x, implementation=implementation)
        print(implementation, "returned")
    except ValueError as error:
        print(implementation, "refused:", error)
"""


def test_zero_outputs_refused_up_front_without_crashing():
    """torchvision num_classes=0 died with SIGFPE inside torch's autograd; it runs in a child so a crash fails here."""
    code = _ZERO_OUTPUTS.format(implementations=ALL)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    for implementation in ALL:
        assert f"{implementation} refused: the model has no outputs" in done.stdout, done.stdout


@pytest.mark.parametrize(
    "fn",
    [
        lambda m, x: m.lin(x)[:, :0],
        lambda m, x: m.lin(x)[:, :, None][:, :, :0],
        lambda m, x: x[:, :0] * m.lin.bias.sum(),
    ],
    ids=["no-columns", "empty-trailing-axis", "empty-slice-of-input"],
)
@pytest.mark.parametrize("implementation", ALL)
def test_empty_outputs_are_refused_before_any_derivative(fn, implementation):
    with pytest.raises(ValueError, match="the model has no outputs"):
        torchntk.ntk(head(fn), _x(2, 4), implementation=implementation)


# --- 5. Unstated assumptions checked ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fn",
    [
        lambda m, x: m.lin(x).sum(0, keepdim=True),
        lambda m, x: m.lin(x)[:1],
        lambda m, x: m.lin(x).mean(0),
        lambda m, x: m.lin(x).reshape(-1),
    ],
    ids=["sum-keepdim", "first-row", "mean-over-batch", "flattened"],
)
@pytest.mark.parametrize("n", [1, 3])
def test_output_must_keep_the_batch(fn, n):
    with pytest.raises(ValueError, match="must keep the batch"):
        torchntk.ntk(head(fn), _x(n, 4), implementation="jacobian_contraction")


def _mul_(m, x):
    return m.lin(x.mul_(2))


def _iadd(m, x):
    x += 1
    return m.lin(x)


def _clamp_(m, x):
    return m.lin(x.clamp_(-0.5, 0.5))


@pytest.mark.parametrize("fn", [_mul_, _iadd, _clamp_])
@pytest.mark.parametrize("implementation", ["auto", *NATIVE])
def test_forward_writing_into_its_input_is_refused_and_the_callers_tensors_kept(fn, implementation):
    x1, x2 = _x(3, 4), _x(2, 4, seed=1)
    before1, before2 = x1.clone(), x2.clone()
    for _ in range(2):  # and nothing compounds across calls
        with pytest.raises(ValueError, match="writes into its input 0 in place"):
            torchntk.ntk(head(fn), x1, x2, implementation=implementation)
    assert torch.equal(x1, before1) and torch.equal(x2, before2)


def test_forward_cloning_before_writing_is_fine():
    model = head(lambda m, x: m.lin(x.clone().mul_(2)))
    x = _x(3, 4)
    before = x.clone()
    for implementation in NATIVE:
        assert _close(torchntk.ntk(model, x, implementation=implementation), oracle_ntk(model, (x,), None))
    assert torch.equal(x, before)


class Counting(nn.Module):
    """Counts its calls in a buffer: every forward changes the model."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.register_buffer("calls", torch.zeros((), dtype=D))

    def forward(self, x: Tensor) -> Tensor:
        self.calls += 1
        return self.lin(x) * (1 + 0 * self.calls)


def _rescale_weight_in_place(m, x):
    with torch.no_grad():
        m.lin.weight.mul_(1.0)
    return m.lin(x)


@pytest.mark.parametrize(
    "model, written", [(Counting().double(), "calls"), (head(_rescale_weight_in_place), "lin.weight")]
)
def test_forward_writing_into_the_models_state_is_refused(model, written):
    with pytest.raises(ValueError, match=rf"writes into its own state in place \({written}"):
        torchntk.ntk(model, _x(2, 4))


class BatchStatNorm(nn.Module):
    """A hand-written batch norm: statistics over the batch even in eval mode."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.lin = nn.Linear(4, width)
        self.scale = nn.Parameter(torch.ones(width))

    def forward(self, x: Tensor) -> Tensor:
        h = self.lin(x)
        return self.scale * (h - h.mean(0)) / (h.var(0, unbiased=False) + 1e-5).sqrt()


@pytest.mark.parametrize(
    "model",
    [
        head(lambda m, x: m.lin(x - x.mean(0))),
        head(lambda m, x: m.lin(x) * x.norm()),
        BatchStatNorm(3).double(),
    ],
    ids=["centering", "batch-norm-of-x", "custom-batch-norm"],
)
@pytest.mark.parametrize("n", [1, 3])
def test_examples_coupled_through_the_batch_are_refused(model, n):
    x1 = _x(n, 4)
    x2 = _x(2, 4, seed=1) if n == 1 else None  # one x1 example: the probe pairs it with x2's first
    with pytest.raises(ValueError, match="examples are coupled"):
        torchntk.ntk(model, x1, x2, implementation="jacobian_contraction")


def test_per_example_normalization_is_fine():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.GroupNorm(2, 6), nn.LayerNorm(6), nn.Tanh(), nn.Linear(6, 2)).double()
    x = _x(3, 4)
    expected = oracle_ntk(model, (x,), None)
    for implementation in NATIVE:
        assert _close(torchntk.ntk(model, x, implementation=implementation), expected)


@pytest.mark.parametrize(
    "fn",
    [
        lambda m, x: F.dropout(m.lin(x), 0.5, training=True),
        lambda m, x: F.dropout(m.lin(x), 0.01, training=True),  # rarely changes a value: seen by the generator
        lambda m, x: m.lin(x + 1e-3 * torch.randn_like(x)),
    ],
    ids=["dropout", "dropout-p-small", "noise"],
)
@pytest.mark.parametrize("implementation", ["auto", *NATIVE])
def test_random_forward_is_refused(fn, implementation):
    model, x = head(fn), _x(3, 4)
    state = torch.random.get_rng_state()
    with pytest.raises(ValueError, match=r"forward is random.*model\.eval\(\)"):
        torchntk.ntk(model, x, implementation=implementation)
    assert torch.equal(torch.random.get_rng_state(), state)  # the probe leaves the caller's random stream alone


def test_dropout_module_with_training_false_is_fine():
    model = head(lambda m, x: F.dropout(m.lin(x), 0.5, training=False))
    x = _x(3, 4)
    assert _close(torchntk.ntk(model, x, implementation="ntk_vector_products"), oracle_ntk(model, (x,), None))


# --- 6. Errors point the right way --------------------------------------------------------------------------------


def test_complex_inputs_refused_at_validation():
    model = head(lambda m, x: m.lin(x))
    with pytest.raises(TypeError, match=r"x1 is complex .*view_as_real"):
        torchntk.ntk(model, torch.randn(2, 4, dtype=torch.complex128))
    with pytest.raises(TypeError, match="x2 is complex"):
        torchntk.ntk(model, _x(2, 4), torch.randn(2, 4, dtype=torch.complex128))


class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 2), nn.Linear(3, 2)

    def forward(self, x: Tensor, z: Tensor) -> Tensor:
        return self.a(x) * self.b(z)


def test_tuple_given_to_a_one_input_model_and_the_reverse():
    one = head(lambda m, x: m.lin(x))
    with pytest.raises(ValueError, match=r"x1 is a tuple of 2 tensors but Head.forward takes 1 input\(s\) \(x\)"):
        torchntk.ntk(one, (_x(2, 4), _x(2, 4)))
    two = TwoInputs().double()
    with pytest.raises(ValueError, match=r"x1 is one tensor but TwoInputs.forward takes 2 input\(s\) \(x, z\)"):
        torchntk.ntk(two, _x(2, 4))
    x = (_x(2, 4), _x(2, 3))
    assert _close(torchntk.ntk(two, x, implementation="jacobian_contraction"), oracle_ntk(two, x, None))


def test_params_dict_with_wrong_dtype_or_device_blames_the_params():
    model = head(lambda m, x: m.lin(x))
    values = {name: p.detach().clone() for name, p in model.named_parameters()}
    with pytest.raises(
        TypeError, match=r"params\['lin.weight'\] is torch.float32 .* model's lin.weight is torch.float64"
    ):
        torchntk.ntk(model, _x(2, 4), params={**values, "lin.weight": values["lin.weight"].float()})
    with pytest.raises(TypeError, match=r"params\['lin.bias'\] is torch.float64 on meta"):
        torchntk.ntk(model, _x(2, 4), params={**values, "lin.bias": values["lin.bias"].to("meta")})
    with pytest.raises(TypeError, match=r"params\['lin.bias'\] must be a real floating"):
        torchntk.ntk(model, _x(2, 4), params={**values, "lin.bias": values["lin.bias"].to(torch.complex128)})


class Recurrent(nn.Module):
    def __init__(self, kind: type[nn.RNNBase]) -> None:
        super().__init__()
        self.rnn = kind(4, 3, batch_first=True)
        self.head = nn.Linear(3, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.rnn(x)[0][:, -1])


@pytest.mark.parametrize("kind", [nn.LSTM, nn.GRU, nn.RNN])
def test_recurrent_layers(kind):
    """vmap cannot batch torch's fused RNNs: Jacobian contraction goes one example at a time (exact), NTK-vector
    products say why they cannot and what to use, and auto returns the kernel."""
    torch.manual_seed(0)
    model = Recurrent(kind).double()
    x1, x2 = _x(3, 5, 4), _x(2, 5, 4, seed=1)
    expected = oracle_ntk(model, (x1,), (x2,))
    assert _close(torchntk.ntk(model, x1, x2, implementation="jacobian_contraction"), expected)
    with pytest.raises(
        UnsupportedModelError, match=rf"recurrent layers rnn \({kind.__name__}\).*'jacobian_contraction'"
    ):
        torchntk.ntk(model, x1, x2, implementation="ntk_vector_products")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # auto may try NTK-vector products first
        assert _close(torchntk.ntk(model, x1, x2), expected)


def _if_finite(m, x):
    if torch.isfinite(x).all():  # per example under vmap: data-dependent control flow
        return m.lin(x)
    return torch.zeros_like(m.lin(x))


def _item(m, x):
    return m.lin(x) * (2.0 if x.abs().max().item() < 1e6 else 1.0)


def _boolean_mask(m, x):
    keep = torch.nonzero(x[0] == x[0]).flatten()  # every column, found by a value-dependent shape
    return m.lin(x[:, keep])


@pytest.mark.parametrize(
    "fn, cause",
    [(_if_finite, "tensor's value in Python"), (_item, "tensor's value in Python"), (_boolean_mask, "output shape")],
    ids=["if-on-tensor", "item", "nonzero"],
)
def test_forward_that_vmap_cannot_batch(fn, cause):
    model = head(fn)
    x = _x(3, 4)
    expected = oracle_ntk(model, (x,), None)
    assert _close(torchntk.ntk(model, x, implementation="jacobian_contraction"), expected)
    with pytest.raises(UnsupportedModelError, match=rf"torchntk ntk_vector_products: .*{cause}.*jacobian_contraction"):
        torchntk.ntk(model, x, implementation="ntk_vector_products")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        assert _close(torchntk.ntk(model, x), expected)


class OldStyleSquare(torch.autograd.Function):
    """forward(ctx, x): no setup_context, so torch.func cannot transform it."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return 2 * x * grad


class SquareWithoutJvp(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return x * x

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return 2 * x * grad


def test_custom_autograd_functions():
    x = _x(3, 4)
    old = head(lambda m, x: OldStyleSquare.apply(m.lin(x)))
    # an old-style Function: Jacobian contraction takes it by torch's backward; forward mode cannot
    assert _close(torchntk.ntk(old, x, implementation="jacobian_contraction"), oracle_ntk(old, (x,), None))
    with pytest.raises(UnsupportedModelError, match=r"custom torch.autograd.Function .*'jacobian_contraction'"):
        torchntk.ntk(old, x, implementation="ntk_vector_products")
    no_jvp = head(lambda m, x: SquareWithoutJvp.apply(m.lin(x)))
    expected = oracle_ntk(no_jvp, (x,), None)
    assert _close(torchntk.ntk(no_jvp, x, implementation="jacobian_contraction"), expected)
    with pytest.raises(UnsupportedModelError, match=r"without a jvp staticmethod.*'jacobian_contraction'"):
        torchntk.ntk(no_jvp, x, implementation="ntk_vector_products")
    with pytest.raises(UnsupportedModelError, match="without a jvp staticmethod"):
        torchntk.ntk_vp(no_jvp, x, None, _x(3, 3))


def test_translated_errors_keep_the_original_as_cause():
    model = head(lambda m, x: OldStyleSquare.apply(m.lin(x)))
    with pytest.raises(UnsupportedModelError) as caught:
        torchntk.ntk(model, _x(2, 4), implementation="ntk_vector_products")
    assert isinstance(caught.value.__cause__, RuntimeError) and "torch said:" in str(caught.value)


def test_structured_ntk_fn_of_constant_functions():
    import jax.numpy as jnp

    from torchntk.bridge import structured_ntk_fn

    params = {"w": jnp.ones((3, 2))}
    x1, x2 = jnp.ones((4, 3)), jnp.ones((2, 3))
    kernel = structured_ntk_fn(lambda p, x: 1.0, vmap_axes=None)(x1, x2, params)
    assert kernel.shape == () and float(kernel) == 0.0
    kernel = structured_ntk_fn(lambda p, x: 3, vmap_axes=None)(x1, None, params)
    assert kernel.shape == () and float(kernel) == 0.0
    kernel = structured_ntk_fn(lambda p, x: jnp.ones((x.shape[0], 2)))(x1, x2, params)
    assert kernel.shape == (4, 2, 2, 2) and not kernel.any()
    kernels = structured_ntk_fn(lambda p, x: (0.5, x @ p["w"]), vmap_axes=None)(x1, x2, params)
    assert kernels[0].shape == () and float(kernels[0]) == 0.0
    assert kernels[1].shape == (4, 2, 2, 2) and float(kernels[1][0, 0, 0, 0]) == pytest.approx(3.0)


# --- 7. max_memory too small: refused before any conversion -------------------------------------------------------


def test_max_memory_too_small_is_refused_before_auto_converts(monkeypatch):
    def no_estimates(*args, **kwargs):
        raise AssertionError("auto estimated (and may have converted) before refusing max_memory")

    monkeypatch.setattr(api_module, "explain_problem", no_estimates)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 3)).double()
    for call in (torchntk.ntk, torchntk.explain):
        with pytest.raises(ValueError, match=r"too small for even one tile .*jacobian_contraction.*structured_deriv"):
            call(model, _x(2, 4), max_memory=64)


def test_max_memory_too_small_for_explicit_structured_is_refused_before_converting(monkeypatch):
    from torchntk.bridge import torch_glue

    def no_conversion(problem):
        raise AssertionError("converted before refusing max_memory")

    monkeypatch.setattr(torch_glue, "convert", no_conversion)
    model = head(lambda m, x: m.lin(x))
    with pytest.raises(ValueError, match="too small for even one tile.*implementation='auto'"):
        torchntk.ntk(model, _x(2, 4), max_memory=16, implementation="structured_derivatives")


def test_max_memory_that_fits_one_method_runs_it():
    model = head(lambda m, x: torch.tanh(m.lin(x)))
    x = _x(3, 4)
    problem = prepare(model, x, None, params=None, trace_axes=(), diagonal_axes=())
    need = api_module.one_pair_bytes(problem, "ntk_vector_products")
    kernel = torchntk.ntk(model, x, max_memory=int(need), implementation="ntk_vector_products")
    assert _close(kernel, oracle_ntk(model, (x,), None))


# --- 8. auto never fails where another method works ---------------------------------------------------------------


class SDPAttention(nn.Module):
    """Self-attention written with F.scaled_dot_product_attention (fused kernels without forward-mode AD)."""

    def __init__(self, width: int = 4, heads: int = 2) -> None:
        super().__init__()
        self.qkv, self.out, self.heads = nn.Linear(width, 3 * width), nn.Linear(width, 2), heads

    def forward(self, x: Tensor) -> Tensor:
        n, t, w = x.shape
        q, k, v = self.qkv(x).reshape(n, t, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        h = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(h.transpose(1, 2).reshape(n, t, w).mean(1))


class MHA(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attention, self.out = nn.MultiheadAttention(4, 2, batch_first=True), nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.attention(x, x, x, need_weights=False)[0].mean(1))


class Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(4, 2, 8, dropout=0.0, batch_first=True)
        self.out = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.layer(x).mean(1))


@pytest.mark.parametrize("kind", [SDPAttention, MHA, Encoder])
@pytest.mark.parametrize("implementation", ["auto", *NATIVE])
def test_attention_every_torch_native_method_matches_the_oracle(kind, implementation):
    torch.manual_seed(0)
    model = kind().double().eval()  # eval: nn's fused attention fast paths are taken
    x1, x2 = _x(3, 5, 4), _x(2, 5, 4, seed=1)
    fastpath = torch.backends.mha.get_fastpath_enabled()
    kernel = torchntk.ntk(model, x1, x2, implementation=implementation)
    assert _close(kernel, oracle_ntk(model, (x1,), (x2,)))
    assert torch.backends.mha.get_fastpath_enabled() == fastpath  # restored
    v = _x(2, 2, seed=2)
    expected = torch.einsum("nmab,mb->na", kernel, v)
    assert torch.allclose(torchntk.ntk_vp(model, x1, x2, v), expected, rtol=1e-9, atol=1e-11)


@pytest.mark.slow
@pytest.mark.parametrize("kind", [SDPAttention, MHA, Encoder])
def test_attention_structured_derivatives_matches_the_oracle(kind):
    torch.manual_seed(0)
    model = kind().double().eval()
    x = _x(3, 5, 4)
    kernel = torchntk.ntk(model, x, implementation="structured_derivatives")
    expected = oracle_ntk(model, (x,), None)
    # 1e-7: the converted nn.MultiheadAttention agrees to ~5e-9 only (float64; the others to ~1e-12)
    assert torch.allclose(kernel, expected, rtol=1e-7, atol=1e-7 * expected.abs().max().item())


def _choose(monkeypatch, choice: str) -> None:
    """Make auto pick ``choice`` (estimates for every method, all fitting)."""
    estimates = tuple(Estimate(m, 1.0, 1.0, 1.0 + (m != choice)) for m in torchntk.IMPLEMENTATIONS)
    explanation = Explanation(choice, estimates, "test")
    monkeypatch.setattr(api_module, "explain_problem", lambda problem, options: explanation)


def test_auto_falls_back_with_one_warning_when_its_choice_fails(monkeypatch):
    _choose(monkeypatch, "ntk_vector_products")
    model = head(lambda m, x: SquareWithoutJvp.apply(m.lin(x)))
    x = _x(3, 4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        kernel = torchntk.ntk(model, x)
    assert _close(kernel, oracle_ntk(model, (x,), None))
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1, messages
    assert "ntk_vector_products failed" in messages[0] and "falls back to jacobian_contraction" in messages[0]


def test_auto_never_swallows_bad_input(monkeypatch):
    _choose(monkeypatch, "ntk_vector_products")
    model = head(lambda m, x: m.lin(x))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning either
        with pytest.raises(ValueError, match="out= is a tensor of shape"):
            torchntk.ntk(model, _x(3, 4), out=torch.empty(2, 2))


def test_auto_raises_its_choice_error_when_every_method_fails(monkeypatch):
    _choose(monkeypatch, "ntk_vector_products")
    model = head(lambda m, x: OldStyleSquare.apply(m.lin(x)))
    monkeypatch.setitem(api_module.IMPLEMENTATIONS, "structured_derivatives", _failing_structured)
    monkeypatch.setitem(api_module.IMPLEMENTATIONS, "jacobian_contraction", _failing_structured)
    with pytest.raises(UnsupportedModelError, match="torchntk ntk_vector_products: the model calls a custom"):
        torchntk.ntk(model, _x(3, 4))


def _failing_structured(problem, options):
    raise RuntimeError("structured derivatives failed too")
