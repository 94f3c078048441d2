"""Bad input gets an error that names the problem and the fix, before any work, and leaves the model untouched."""

from __future__ import annotations

import pytest
import torch
from _zoo import make
from torch import nn

import torchntk
from torchntk.converters import ConversionError


@pytest.fixture
def mlp():
    return make("mlp")


def _untouched(model, snapshot):
    return all(torch.equal(v, snapshot[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"implementation": "fastest"}, ValueError, "unknown implementation 'fastest'"),
        ({"trace_axes": (2,)}, ValueError, "out of range"),
        ({"diagonal_axes": (-3,)}, ValueError, "out of range"),
        ({"trace_axes": (1,), "diagonal_axes": (1,)}, ValueError, "both trace_axes and diagonal_axes"),
        ({"trace_axes": (0,)}, ValueError, "batch axis 0"),
        ({"trace_axes": (1.0,)}, TypeError, "integers"),
        ({"diagonal_axes": (0,)}, ValueError, "N1 == N2"),
        ({"params": []}, ValueError, "no parameter selected"),
        ({"params": lambda n, p: False}, ValueError, "predicate selected no parameter"),
        ({"params": ["nope.weight"]}, ValueError, "not parameters of the model"),
        ({"params": "0.weight"}, TypeError, "list of names"),
        ({"chunk_size": 0}, ValueError, "chunk_size must be a positive integer"),
    ],
)
def test_bad_arguments(mlp, kwargs, error, match):
    model, x1, x2 = mlp
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(error, match=match):
        torchntk.ntk(model, x1, x2, **kwargs)
    assert _untouched(model, snapshot)


def test_different_example_shapes(mlp):
    model, x1, _ = mlp
    with pytest.raises(ValueError, match=r"runs on x1's examples .* but fails on x2's \(\[\(5,\)\]\).*mat1 and mat2"):
        torchntk.ntk(model, x1, torch.randn(2, 5, dtype=torch.float64))


def test_integer_inputs(mlp):
    model, _, _ = mlp
    with pytest.raises(TypeError, match=r"input 0 \(torch.int64\).*x\.to\(torch.float64\)"):
        torchntk.ntk(model, torch.ones(2, 4, dtype=torch.long))


def test_empty_batch(mlp):
    model, _, _ = mlp
    with pytest.raises(ValueError, match="empty batch"):
        torchntk.ntk(model, torch.zeros(0, 4, dtype=torch.float64))


def test_scalar_and_non_tensor_inputs(mlp):
    model, _, _ = mlp
    with pytest.raises(ValueError, match="batch axis"):
        torchntk.ntk(model, torch.tensor(1.0, dtype=torch.float64))
    with pytest.raises(TypeError, match="not a torch.Tensor"):
        torchntk.ntk(model, [[1.0, 2.0, 3.0, 4.0]])


def test_dtype_mismatch(mlp):
    model, x1, _ = mlp
    with pytest.raises(TypeError, match="cast the inputs"):
        torchntk.ntk(model, x1[0].float())


@pytest.mark.parametrize("layer", [nn.BatchNorm1d(6), nn.Dropout(0.1)])
def test_training_mode_with_batchnorm_or_dropout(layer):
    model = nn.Sequential(nn.Linear(4, 6), layer, nn.Linear(6, 2)).double().train()
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"training mode.*model\.eval\(\)"):
        torchntk.ntk(model, torch.randn(3, 4, dtype=torch.float64))
    assert model.training and _untouched(model, snapshot)
    assert torchntk.ntk(model.eval(), torch.randn(3, 4, dtype=torch.float64)).shape == (3, 3, 2, 2)


def test_training_mode_without_such_layers_is_fine(mlp):
    model, x1, _ = mlp
    assert torchntk.ntk(model.train(), x1).shape == (3, 3, 3, 3)


def test_model_with_tuple_output():
    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 2)

        def forward(self, x):
            return self.lin(x), x

    with pytest.raises(TypeError, match="one tensor of shape"):
        torchntk.ntk(TwoHeads(), torch.randn(2, 4))


def test_mismatched_multi_input_batches():
    model, x1, _ = make("two_inputs")
    with pytest.raises(ValueError, match="different batch sizes"):
        torchntk.ntk(model, (x1[0], x1[1][:2]))
    with pytest.raises(ValueError, match="x1 has 2 input tensors and x2 has 1"):
        torchntk.ntk(model, x1, x1[0])


def test_ntk_vp_wrong_vector_shape(mlp):
    model, x1, x2 = mlp
    with pytest.raises(ValueError, match="v has shape"):
        torchntk.ntk_vp(model, x1, x2, torch.ones(3, 3, dtype=torch.float64))


def test_a_scripted_submodule_is_refused_by_structured_derivatives_and_computed_by_the_others():
    """Forward hooks (the conversion's custom-Function check, the activation count) raised a bare RuntimeError on a
    ``torch.jit.script`` submodule; torch.export cannot trace one. Structured derivatives refuse it by name; the
    torch-native methods and auto compute the kernel."""

    class WithScripted(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = torch.jit.script(torch.nn.Linear(4, 3))
            self.head = torch.nn.Linear(3, 2)

        def forward(self, x):
            return self.head(torch.tanh(self.inner(x)))

    torch.manual_seed(0)
    model = WithScripted().double().eval()
    x1, x2 = torch.randn(3, 4, dtype=torch.float64), torch.randn(2, 4, dtype=torch.float64)
    with pytest.raises(ConversionError, match=r"\['inner'\] is a scripted module"):
        torchntk.ntk(model, x1, x2, implementation="structured_derivatives")
    expected = torchntk.ntk(model, x1, x2, implementation="jacobian_contraction")
    for implementation in ("ntk_vector_products", "auto"):
        kernel = torchntk.ntk(model, x1, x2, implementation=implementation)
        assert torch.allclose(kernel, expected, rtol=1e-10, atol=1e-12)


class _Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 3)
        self.b.weight = self.a.weight  # one parameter, two names: a.weight (canonical) and b.weight
        self.register_buffer("gain", torch.ones(3))

    def forward(self, x):
        return self.b(torch.tanh(self.a(x))) * self.gain


def test_a_tied_parameter_is_selected_by_any_of_its_names():
    from _oracle import oracle_ntk

    model = _Tied().double()
    x = torch.randn(3, 3, dtype=torch.float64)
    want = oracle_ntk(model, (x,), None, names=["a.weight"])
    for method in ("jacobian_contraction", "ntk_vector_products", "structured_derivatives", "auto"):
        for name in ("a.weight", "b.weight"):
            got = torchntk.ntk(model, x, params=[name], implementation=method)
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
        got = torchntk.ntk(model, x, params={"b.weight": model.a.weight.detach()}, implementation=method)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match=r"tied parameter 'a.weight' twice \(as 'b.weight' too\)"):
        torchntk.ntk(model, x, params={"a.weight": model.a.weight.detach(), "b.weight": model.a.weight.detach()})


def test_a_buffer_in_params_is_refused_by_every_method():
    """Differentiated as a parameter by the torch-native methods before (a state_dict passed whole: stop 29)."""
    model = _Tied().double()
    x = torch.randn(3, 3, dtype=torch.float64)
    selection = {"a.bias": model.a.bias.detach(), "gain": model.gain}
    for method in ("jacobian_contraction", "ntk_vector_products", "structured_derivatives", "auto"):
        with pytest.raises(ValueError, match=r"params holds buffers \['gain'\]"):
            torchntk.ntk(model, x, params=selection, implementation=method)


def test_ntk_vp_complex_or_meta_vector(mlp):
    """A complex v silently lost its imaginary part (a torch warning only); a meta v failed inside torch."""
    model, x1, _ = mlp
    n, out = x1[0].shape[0], model(*x1).shape[1:]
    with pytest.raises(TypeError, match="v has dtype torch.complex128; Θ·v takes a real vector"):
        torchntk.ntk_vp(model, x1, None, torch.ones(n, *out, dtype=torch.complex128))
    with pytest.raises(ValueError, match="v is on the meta device"):
        torchntk.ntk_vp(model, x1, None, torch.empty(n, *out, device="meta"))


@pytest.mark.parametrize("kind", ["sparse", "nested"])
def test_a_sparse_or_nested_output_is_refused_by_name(kind):
    """Found by hostile probing: torch's own "Could not run 'aten::ne.Scalar' ... SparseCPU" / "NestedTensorImpl
    doesn't support sizes" came out of every method."""

    class Returns(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(3, 2)

        def forward(self, x):
            y = self.lin(x)
            return y.to_sparse() if kind == "sparse" else torch.nested.nested_tensor(list(y))

    fix = "to_dense" if kind == "sparse" else "to_padded_tensor"
    with pytest.raises(TypeError, match=f"returned a {kind}.*{fix}"):
        torchntk.ntk(Returns().double(), torch.randn(2, 3, dtype=torch.float64))


@pytest.mark.parametrize("wrap", ["DataParallel", "script", "trace"])
def test_a_wrapped_or_scripted_model_names_the_module_to_pass(wrap):
    """Found by hostile probing: torch's "The stateless API can't be used with ..." came out of every method."""
    inner = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).double()
    x = torch.randn(2, 3, dtype=torch.float64)
    model = {
        "DataParallel": lambda: torch.nn.DataParallel(inner),
        "script": lambda: torch.jit.script(inner),
        "trace": lambda: torch.jit.trace(inner, x),
    }[wrap]()
    fix = "model.module" if wrap == "DataParallel" else "TorchScript module"
    for implementation in ("jacobian_contraction", "ntk_vector_products", "auto"):
        with pytest.raises(TypeError, match=fix):
            torchntk.ntk(model, x, implementation=implementation)
