"""Eigenvalues, condition number and NTK ridge regression (torchntk.linalg) against numpy/scipy on the explicitly
built kernel of the oracle, plus bad input."""

from __future__ import annotations

import copy
import math
import warnings

import numpy as np
import pytest
import torch
from _oracle import oracle_ntk
from _zoo import make

import torchntk
from torchntk import linalg

RTOL = 1e-8

# (zoo name, N): kernels of N·O rows below the parameter count, condition numbers 4 to ~2e3 (checked in `case`);
# two_inputs has two inputs, conv_map a (C, H, W) output.
CASES = [("mlp", 6), ("two_inputs", 5), ("conv_map", 1), ("residual", 3)]


def flat(kernel: torch.Tensor) -> np.ndarray:
    """Interleaved ``(N1, N2, a1, b1, a2, b2, ...)`` -> the ``(N1·O, N2·O)`` matrix, rows ``(n, a1, a2, ...)``."""
    nd = kernel.ndim
    order = [*range(0, nd, 2), *range(1, nd, 2)]
    rows = math.prod(kernel.shape[0::2])
    return kernel.permute(order).reshape(rows, -1).numpy()


def close(actual: torch.Tensor, expected: np.ndarray) -> None:
    """Relative agreement in norm (entries near zero make elementwise rtol meaningless)."""
    assert actual.dtype == torch.float64
    assert tuple(actual.shape) == expected.shape
    assert np.linalg.norm(actual.numpy() - expected) <= RTOL * np.linalg.norm(expected)


@pytest.fixture(scope="module", params=CASES, ids=[name for name, _ in CASES])
def case(request):
    name, n = request.param
    model, x, x_test = make(name, n1=n, n2=3)
    kernel = flat(oracle_ntk(model, x, None))
    eig = np.linalg.eigvalsh(kernel)
    assert eig[0] > 0 and eig[-1] / eig[0] < 1e4  # the 1e-8 comparisons below need a well-conditioned kernel
    return model, x, x_test, kernel, eig


@pytest.mark.parametrize("method", ["lanczos", "dense"])
@pytest.mark.parametrize("which", ["largest", "smallest", "both"])
def test_eigvalsh(case, which, method):
    model, x, _, _, eig = case
    k = 3
    expected = {"largest": eig[-k:], "smallest": eig[:k], "both": np.r_[eig[:1], eig[-2:]]}[which]
    values = torchntk.eigvalsh(model, x, k=k, which=which, method=method)
    np.testing.assert_allclose(values.numpy(), expected, rtol=RTOL)


def test_eigvalsh_all_dense(case):
    model, x, _, _, eig = case
    np.testing.assert_allclose(torchntk.eigvalsh(model, x, k=eig.size, method="dense").numpy(), eig, rtol=RTOL)


@pytest.mark.parametrize("method", ["lanczos", "dense"])
def test_condition_number(case, method):
    model, x, _, _, eig = case
    assert torchntk.condition_number(model, x, method=method) == pytest.approx(eig[-1] / eig[0], rel=RTOL)


@pytest.mark.parametrize("method", ["cg", "dense"])
@pytest.mark.parametrize("ridge", [0.0, 0.3])
def test_kernel_regression(case, method, ridge):
    model, x, x_test, kernel, _ = case
    y = torch.randn(
        x[0].shape[0], *model(*x).shape[1:], dtype=torch.float64, generator=torch.Generator().manual_seed(1)
    )
    cross = flat(oracle_ntk(model, x_test, x))
    expected = cross @ np.linalg.solve(kernel + ridge * np.eye(len(kernel)), y.numpy().reshape(-1))
    # tol: the solve's residual, amplified by at most the condition number (~2e3), must stay under 1e-8.
    pred = torchntk.kernel_regression(model, x, y, x_test, ridge=ridge, method=method, tol=1e-13)
    close(pred, expected.reshape(x_test[0].shape[0], *y.shape[1:]))


def test_auto_picks_dense_when_small_and_iterative_when_large(monkeypatch):
    model, x, x_test = make("mlp", n1=4)
    y = torch.randn(4, 3, dtype=torch.float64)
    dense_eig = torchntk.eigvalsh(model, x, k=2)
    dense_pred = torchntk.kernel_regression(model, x, y, x_test, ridge=0.1)

    def refuse(*args, **kwargs):
        raise AssertionError("the kernel was built")

    monkeypatch.setattr(linalg, "DENSE_MAX_ROWS", 5)
    monkeypatch.setattr(linalg, "ntk", refuse)
    np.testing.assert_allclose(torchntk.eigvalsh(model, x, k=2).numpy(), dense_eig.numpy(), rtol=RTOL)
    close(torchntk.kernel_regression(model, x, y, x_test, ridge=0.1, tol=1e-13), dense_pred.numpy())


def test_singular_kernel():
    # The tied autoencoder's kernel on 5 examples (20 rows, 27 parameters) is singular: the parameter count does not
    # reveal it, only the spectrum does.
    model, x, x_test = make("tied", n1=5)
    y = torch.randn(5, 4, dtype=torch.float64)
    for method in ("lanczos", "dense"):
        with pytest.warns(RuntimeWarning, match="numerically singular"):
            assert torchntk.condition_number(model, x, method=method) == math.inf
    with pytest.raises(ValueError, match=r"numerically singular.*Pass a larger ridge > 0"):
        torchntk.kernel_regression(model, x, y, x_test, method="dense")
    with pytest.raises(RuntimeError, match=r"did not solve.*ridge > 0"):
        torchntk.kernel_regression(model, x, y, x_test, method="cg")
    # A ridge makes it solvable.
    assert torchntk.kernel_regression(model, x, y, x_test, ridge=1e-3, method="cg").shape == (2, 4)


@pytest.mark.parametrize("ridge", [1e-20, 1e-14])
def test_cg_checks_its_true_residual(ridge):
    """A duplicated training example with two targets: no α solves it. scipy's CG stopped on its running residual
    estimate (info=0) with a true residual of 2e4 and returned predictions 1e4 times too large; a kernel of rank
    P < N·O with a tiny ridge gave predictions 0.5% off. Both raise now, naming the true residual."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Tanh(), torch.nn.Linear(3, 1)).double()  # P = 13
    x = torch.randn(14, 2, dtype=torch.float64)
    x[1] = x[0]
    y = torch.randn(14, 1, dtype=torch.float64)
    with pytest.raises(RuntimeError, match=r"did not solve.*true relative residual"):
        torchntk.kernel_regression(model, x, y, x[:2], ridge=ridge, method="cg")


def test_more_outputs_than_parameters():
    torch.manual_seed(0)
    model = torch.nn.Linear(2, 1).double()  # P = 3
    x = torch.randn(5, 2, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="rank at most P = 3"):
        assert torchntk.condition_number(model, x) == math.inf
    with pytest.raises(ValueError, match=r"ridge=0 .*rank at most P = 3.*Pass ridge > 0"):
        torchntk.kernel_regression(model, x, torch.randn(5, 1, dtype=torch.float64), x)


@pytest.fixture(scope="module")
def mlp():
    return make("mlp")  # N = 3, O = 3: N·O = 9


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"k": 0}, ValueError, "k must be a positive integer"),
        ({"k": 2.0}, ValueError, "k must be a positive integer"),
        ({"k": 9, "method": "lanczos"}, ValueError, r"k=9 but Lanczos .* pass k < 9, or method='dense'"),
        ({"k": 10, "method": "dense"}, ValueError, r"k=10 is larger than the kernel.*pass k <= 9"),
        ({"which": "middle"}, ValueError, "unknown which='middle'"),
        ({"k": 1, "which": "both"}, ValueError, "which='both' needs k >= 2"),
        ({"method": "power"}, ValueError, "unknown method 'power'"),
        ({"tol": -1e-3}, ValueError, r"tol must be a number in \[0, 1\)"),
    ],
)
def test_bad_eigvalsh(mlp, kwargs, error, match):
    model, x, _ = mlp
    with pytest.raises(error, match=match):
        torchntk.eigvalsh(model, x, **kwargs)


def test_bad_condition_number():
    model, x, _ = make("mlp", n1=1)  # N·O = 3
    with pytest.raises(ValueError, match="unknown method 'cg'"):
        torchntk.condition_number(model, x, method="cg")
    with pytest.raises(ValueError, match="N·O >= 3"):
        torchntk.condition_number(torch.nn.Linear(4, 2).double(), x[0], method="lanczos")


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"y_train": torch.zeros(3)}, ValueError, r"y_train has shape \(3,\).*\(3, 3\)"),
        ({"y_train": torch.zeros(2, 3)}, ValueError, r"y_train has shape \(2, 3\)"),
        ({"y_train": torch.zeros(3, 3, dtype=torch.long)}, TypeError, "floating targets"),
        ({"y_train": [[0.0] * 3] * 3}, TypeError, "torch.Tensor"),
        ({"ridge": -1.0}, ValueError, "ridge must be a finite number >= 0"),
        ({"ridge": float("nan")}, ValueError, "ridge must be a finite number >= 0"),
        ({"method": "lanczos"}, ValueError, "unknown method 'lanczos'"),
        ({"tol": 0}, ValueError, r"tol must be a number in \(0, 1\)"),
        ({"maxiter": 0}, ValueError, "maxiter must be a positive integer"),
        ({"x_test": torch.zeros(2, 5, dtype=torch.float64)}, ValueError, "but fails on x_test's"),
    ],
)
def test_bad_kernel_regression(mlp, kwargs, error, match):
    model, x, x_test = mlp
    args = {"y_train": torch.zeros(3, 3, dtype=torch.float64), "x_test": x_test, "ridge": 0.1, **kwargs}
    with pytest.raises(error, match=match):
        torchntk.kernel_regression(model, x, args.pop("y_train"), args.pop("x_test"), **args)


def test_datasets_zero_kernels_and_numpy_integers():
    """Found by hostile probing: eigvalsh/kernel_regression on a Dataset raised (prepared columns passed on to ntk
    were refused as "a DatasetColumn"); Lanczos on an all-zero kernel raised ARPACK's "starting vector is zero";
    k=np.int64(2) was "not a positive integer"; Lanczos on a 1×1 kernel asked for k < 1."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(2, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).double()
    x, x_test = torch.randn(5, 2, dtype=torch.float64), torch.randn(2, 2, dtype=torch.float64)
    y = torch.randn(5, 2, dtype=torch.float64)
    data = torchntk.DatasetInputs(torch.utils.data.TensorDataset(x, torch.arange(5)), input_key=0)
    data_test = torchntk.DatasetInputs(torch.utils.data.TensorDataset(x_test, torch.arange(2)), input_key=0)
    for method in ("dense", "lanczos"):
        want = torchntk.eigvalsh(model, x, k=3, method=method)
        torch.testing.assert_close(torchntk.eigvalsh(model, data, k=np.int64(3), method=method), want)
    for method in ("dense", "cg"):
        want = torchntk.kernel_regression(model, x, y, x_test, ridge=1e-2, method=method)
        for train, test in ((data, x_test), (x, data_test), (data, data_test)):
            got = torchntk.kernel_regression(model, train, y, test, ridge=1e-2, method=method)
            torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-10)
    with torch.no_grad():
        model[2].weight.zero_()
        model[2].bias.zero_()
        model[0].weight.zero_()
        model[0].bias.zero_()
    # Θ = 0 where every Jacobian vanishes: tanh'(0)·0 into the last layer and zero features (bias gradients are 1:
    # select the weights only)
    weights = ["0.weight", "2.weight"]
    for method in ("dense", "lanczos"):
        got = torchntk.eigvalsh(model, x, k=3, method=method, params=weights)
        torch.testing.assert_close(got, torch.zeros(3, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"Lanczos \(scipy eigsh\) needs N·O >= 2 but the kernel is 1×1"):
        torchntk.eigvalsh(torch.nn.Linear(2, 1).double(), x[:1], k=1, method="lanczos")


def test_cg_in_float32_reaches_what_float32_allows():
    """float32 kernel products round near 1e-6: the default tol=1e-10 is out of reach. A well-conditioned system is
    solved quietly; an ill-conditioned one is returned with a warning giving its residual, near float64's answer."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 64), torch.nn.Tanh(), torch.nn.Linear(64, 2))
    x, y, x_test = torch.randn(40, 4), torch.randn(40, 2), torch.randn(5, 4)
    wide = copy.deepcopy(model).double()
    for ridge, warns in ((1.0, False), (1e-3, True)):
        want = torchntk.kernel_regression(wide, x.double(), y.double(), x_test.double(), ridge=ridge, method="dense")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = torchntk.kernel_regression(model, x, y, x_test, ridge=ridge, method="cg")
        said = [str(w.message) for w in caught if "true relative residual" in str(w.message)]
        assert bool(said) == warns, said
        assert float((got.double() - want).abs().max() / want.abs().max()) < 1e-4


def test_an_ill_conditioned_condition_number_by_lanczos_and_a_missing_x_test():
    """Stop 29: at tol=0 ARPACK did not converge on a kernel of condition 2.4e6 (40 rows), and told the caller to
    pass a tol condition_number had no argument for; kernel_regression(x_test=None) failed inside tuple()."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 10), torch.nn.Tanh(), torch.nn.Linear(10, 2)).double().eval()
    x = torch.randn(20, 3, dtype=torch.float64)
    values = np.linalg.eigvalsh(oracle_ntk(model, (x,), None).permute(0, 2, 1, 3).reshape(40, 40).numpy())
    assert values[-1] / values[0] > 1e6
    got = torchntk.condition_number(model, x, method="lanczos")
    assert got == pytest.approx(values[-1] / values[0], rel=1e-5)
    with pytest.raises(TypeError, match="x_test is None"):
        torchntk.kernel_regression(model, x, torch.zeros(20, 2, dtype=torch.float64), None, ridge=1e-3)
