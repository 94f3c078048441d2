"""Using the NTK as a linear map without necessarily building it (paper §L): eigenvalues, condition number, and
NTK ridge regression.

Each function sees Θ(x, x) as the symmetric PSD matrix of size ``N·O × N·O`` (outputs ``(N, *out)`` flattened, O =
prod(out), row index ``(n, a)`` in row-major order). It either builds that matrix with :func:`torchntk.ntk`
("dense") or applies it to vectors with :func:`torchntk.ntk_vp` inside scipy's Lanczos (``eigsh``) or conjugate
gradients (``cg``), which costs about one VJP and one JVP over the batch per iteration and never holds ``N²O²``
numbers.
"""

from __future__ import annotations

import math
import numbers

import numpy as np
import scipy.sparse.linalg as spla
import torch
from torch import Tensor, nn

from torchntk._api import ntk, ntk_vp
from torchntk._caller_state import caller_state_set_aside
from torchntk._module_state import model_kept_as_it_was
from torchntk._precision import accumulation_dtype, in_kernel_precision
from torchntk._problem import Inputs, NTKProblem, ParamSelection, prepare
from torchntk._warnings import warn
from torchntk.torch_native._errors import UnsupportedModelError

# "auto" builds the kernel when it has at most this many rows: 2048² float64 is 32 MiB and a dense eigh/solve
# takes about a second, while Lanczos/CG would need tens to hundreds of ntk_vp calls.
DENSE_MAX_ROWS = 2048

_WHICH = {"largest": "LA", "smallest": "SA", "both": "BE"}


def _prepare(
    model: nn.Module, x1: Inputs, x2: Inputs | None, params: ParamSelection, names: tuple[str, str] = ("x", "x2")
) -> NTKProblem:
    return prepare(model, x1, x2, params=params, trace_axes=(), diagonal_axes=(), names=names)


def _rows(problem: NTKProblem) -> int:
    """N·O, the side of the flattened kernel Θ(x1, x1)."""
    return problem.n1 * problem.out_size


def _use_dense(method: str, allowed: tuple[str, str], rows: int) -> bool:
    iterative, dense = allowed
    if method not in ("auto", *allowed):
        raise ValueError(f"unknown method {method!r}; choose one of 'auto', {iterative!r}, {dense!r}.")
    return method == dense or (method == "auto" and rows <= DENSE_MAX_ROWS)


def _singular_below(lam_max: float, rows: int, dtype: torch.dtype) -> float:
    """Eigenvalues at or below this are numerically zero: the kernel's entries carry relative errors of about the
    output dtype's epsilon, scaled by the matrix size (numpy's ``matrix_rank`` convention)."""
    return rows * torch.finfo(dtype).eps * lam_max


def _rank_hint(problem: NTKProblem) -> str:
    if _rows(problem) > problem.num_params:
        return (
            f" It is singular by construction: Θ = J Jᵀ has rank at most P = {problem.num_params} parameters, less "
            f"than N·O = {_rows(problem)}."
        )
    return ""


def _dense_kernel(problem: NTKProblem, chunk_size: int | None) -> Tensor:
    """Θ(x1, x1) as a symmetric ``Tensor[N·O, N·O]`` (symmetrized: tiles computed apart differ by rounding)."""
    # in this process only, as the Lanczos and CG paths' products are: a call on one rank of a torch.distributed job
    # (rank 0 solving after a distributed kernel) waited for the other ranks until the group's timeout
    kernel = _as_matrix(ntk(problem.model, problem.x1, params=problem.params, chunk_size=chunk_size, distributed=False))
    return (kernel + kernel.T) / 2


def _as_matrix(kernel: Tensor) -> Tensor:
    """A kernel ``(n, m, a1, b1, a2, b2, ...)`` (interleaved) as ``Tensor[n·a1·a2…, m·b1·b2…]``."""
    k = kernel.ndim // 2 - 1
    rows = kernel.permute(*range(0, 2 * k + 2, 2), *range(1, 2 * k + 2, 2))
    return rows.reshape(math.prod(rows.shape[: k + 1]), -1)


class _KernelOperator(spla.LinearOperator):
    """``v ↦ (Θ(x, x) + shift·I) v`` on flattened float64 numpy vectors, by :func:`torchntk.ntk_vp` (symmetric)."""

    def __init__(self, problem: NTKProblem, chunk_size: int | None, shift: float = 0.0) -> None:
        self.problem, self.chunk_size, self.shift = problem, chunk_size, shift
        super().__init__(np.float64, (_rows(problem), _rows(problem)))

    def _matmat(self, x: np.ndarray) -> np.ndarray:
        p = self.problem
        v = torch.as_tensor(np.ascontiguousarray(x.T), dtype=p.out_dtype, device=p.device)
        # All columns go through one ntk_vp call (its K-vector form is vmapped), as eigsh's block products want.
        out = ntk_vp(
            p.model,
            p.x1,
            None,
            v.reshape(x.shape[1], p.n1, *p.out_shape),
            params=p.params,
            chunk_size=self.chunk_size,
            progress=False,
        )
        return out.reshape(x.shape[1], -1).T.to("cpu", torch.float64).numpy() + self.shift * x

    def _adjoint(self) -> _KernelOperator:
        return self


def _check_k(k: int, which: str, rows: int, dense: bool) -> None:
    if which not in _WHICH:
        raise ValueError(f"unknown which={which!r}; choose 'largest', 'smallest' or 'both'.")
    if not isinstance(k, numbers.Integral) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k must be a positive integer (the number of eigenvalues), got {k!r}.")
    if which == "both" and k < 2:
        raise ValueError("which='both' needs k >= 2 (k // 2 from the bottom, the rest from the top); pass k=2.")
    if dense and k > rows:
        raise ValueError(f"k={k} is larger than the kernel, which has N·O = {rows} eigenvalues; pass k <= {rows}.")
    if not dense and rows < 2:
        raise ValueError(f"Lanczos (scipy eigsh) needs N·O >= 2 but the kernel is {rows}×{rows}; use method='dense'.")
    if not dense and k >= rows:
        raise ValueError(
            f"k={k} but Lanczos (scipy eigsh) finds at most N·O - 1 = {rows - 1} of the kernel's {rows} "
            f"eigenvalues; pass k < {rows}, or method='dense' for all of them."
        )


def _eigenvalues(problem: NTKProblem, k: int, which: str, method: str, tol: float, chunk_size: int | None) -> Tensor:
    rows = _rows(problem)
    dense = _use_dense(method, ("lanczos", "dense"), rows)
    _check_k(k, which, rows, dense)
    k = int(k)
    if dense:
        kernel = _dense_kernel(problem, chunk_size)
        every = torch.linalg.eigvalsh(kernel.to(accumulation_dtype(kernel.dtype))).to(kernel.dtype)  # ascending
        low = {"largest": 0, "smallest": k, "both": k // 2}[which]
        return torch.cat([every[:low], every[rows - (k - low) :]])
    start = np.random.default_rng(0).standard_normal(rows)  # a fixed start: the same call gives the same answer
    operator = _KernelOperator(problem, chunk_size)
    try:
        values = spla.eigsh(operator, k=k, which=_WHICH[which], v0=start, tol=tol, return_eigenvectors=False)
    except spla.ArpackNoConvergence as error:
        raise RuntimeError(
            f"Lanczos (scipy eigsh) did not converge for k={k}, which={which!r} (tol={tol}): {error}. Pass a larger "
            "tol= (e.g. 1e-6), a smaller k, or method='dense' if the N·O × N·O kernel fits in memory. The smallest "
            "eigenvalues of an ill-conditioned kernel cluster near 0, where Lanczos converges slowly."
        ) from error
    except spla.ArpackError as error:  # "starting vector is zero": Θ v0 = 0 for a random v0, i.e. Θ = 0
        if np.any(operator.matvec(start)):
            raise RuntimeError(f"Lanczos (scipy eigsh) failed: {error}. Use method='dense'.") from error
        values = np.zeros(k)
    return torch.as_tensor(np.sort(values), dtype=problem.out_dtype, device=problem.device)


def _check_tol(tol: float) -> None:
    if not isinstance(tol, int | float) or isinstance(tol, bool) or not 0 <= tol < 1:
        raise ValueError(f"tol must be a number in [0, 1) (0: machine precision), got {tol!r}.")


@caller_state_set_aside
@in_kernel_precision
@model_kept_as_it_was
def eigvalsh(
    model: nn.Module,
    x: Inputs,
    k: int = 6,
    *,
    which: str = "largest",
    params: ParamSelection = None,
    method: str = "auto",
    tol: float = 0.0,
    chunk_size: int | None = None,
) -> Tensor:
    """``k`` eigenvalues of Θ(x, x) seen as the ``N·O × N·O`` symmetric matrix: ``Tensor[k]``, ascending.

    Args:
        model, x, params, chunk_size: as in :func:`torchntk.ntk` (``x``: ``Tensor[N, ...]`` or a tuple of them).
        k: how many eigenvalues; ``1 <= k <= N·O`` for ``"dense"``, ``k < N·O`` for ``"lanczos"``.
        which: ``"largest"``, ``"smallest"``, or ``"both"`` (``k // 2`` smallest and ``k - k // 2`` largest).
        method: ``"lanczos"`` (scipy ``eigsh`` on a ``LinearOperator`` calling :func:`torchntk.ntk_vp`; never builds
            Θ), ``"dense"`` (builds Θ with :func:`torchntk.ntk`, then ``torch.linalg.eigvalsh``), or ``"auto"``:
            dense when ``N·O <= DENSE_MAX_ROWS`` (2048).
        tol: Lanczos relative accuracy of each eigenvalue; 0 means machine precision. Ignored by ``"dense"``.

    Returns:
        ``Tensor[k]`` in the output's dtype on the model's device. Lanczos converges slowly for the smallest
        eigenvalues of an ill-conditioned kernel, where the spectrum clusters near 0.
    """
    _check_tol(tol)
    return _eigenvalues(_prepare(model, x, None, params), k, which, method, tol, chunk_size)


@caller_state_set_aside
@in_kernel_precision
@model_kept_as_it_was
def condition_number(
    model: nn.Module,
    x: Inputs,
    *,
    params: ParamSelection = None,
    method: str = "auto",
    tol: float = 1e-6,
    chunk_size: int | None = None,
) -> float:
    """λ_max / λ_min of Θ(x, x) (``N·O × N·O``), e.g. to judge trainability (paper §L).

    ``method`` and ``tol`` as in :func:`eigvalsh` (Lanczos takes both ends at once, ``which="both"``, and needs
    N·O >= 3). ``tol`` is 1e-6 here (each eigenvalue to a millionth, the ratio to about two): at machine precision
    ARPACK did not converge on the small end of an ordinary kernel of condition 2e6 (40 rows).

    Returns ``math.inf``, with a ``RuntimeWarning``, when Θ is numerically singular: λ_min <= N·O · eps · λ_max,
    eps being the machine epsilon of the model's output dtype (numpy's ``matrix_rank`` tolerance). Below that
    threshold λ_min is rounding noise (it can even come out negative), so any finite ratio would be meaningless.
    This always happens when N·O exceeds the number of parameters P.
    """
    _check_tol(tol)
    problem = _prepare(model, x, None, params)
    rows = _rows(problem)
    if method == "lanczos" and rows < 3:
        raise ValueError(f"Lanczos needs N·O >= 3 for both ends of the spectrum, but N·O = {rows}; use method='dense'.")
    values = _eigenvalues(problem, min(2, rows), "both" if rows > 1 else "largest", method, tol, chunk_size)
    lam_min, lam_max = values[0].item(), values[-1].item()
    if lam_min <= _singular_below(lam_max, rows, problem.out_dtype):
        warn(
            f"Θ(x, x) is numerically singular (λ_min = {lam_min:.3g}, λ_max = {lam_max:.3g}); its condition number "
            f"is infinite.{_rank_hint(problem)}"
        )
        return math.inf
    return lam_max / lam_min


def _check_regression(problem: NTKProblem, y_train: Tensor, ridge: float, tol: float, maxiter: int | None) -> None:
    expected = (problem.n1, *problem.out_shape)
    if not isinstance(y_train, Tensor):
        raise TypeError(f"y_train must be a torch.Tensor of shape {expected}, got {type(y_train).__name__}.")
    if tuple(y_train.shape) != expected:
        raise ValueError(
            f"y_train has shape {tuple(y_train.shape)}, but the model's output for x_train has shape {expected}; "
            f"pass targets shaped like the output (e.g. y_train.reshape{expected})."
        )
    if not y_train.is_floating_point():
        raise TypeError(
            f"y_train has dtype {y_train.dtype}; pass floating targets (e.g. y_train.to({problem.out_dtype}))."
        )
    if not isinstance(ridge, int | float) or isinstance(ridge, bool) or not math.isfinite(ridge) or ridge < 0:
        raise ValueError(f"ridge must be a finite number >= 0 (added to the kernel's diagonal), got {ridge!r}.")
    if ridge == 0 and _rows(problem) > problem.num_params:
        raise ValueError(
            "with ridge=0 the system Θ(x_train, x_train) α = y_train has no unique solution."
            f"{_rank_hint(problem)} Pass ridge > 0."
        )
    if not isinstance(tol, int | float) or isinstance(tol, bool) or not 0 < tol < 1:
        raise ValueError(f"tol must be a number in (0, 1) (the relative residual CG stops at), got {tol!r}.")
    if maxiter is not None and (not isinstance(maxiter, int) or isinstance(maxiter, bool) or maxiter < 1):
        raise ValueError(f"maxiter must be a positive integer or None, got {maxiter!r}.")


def _solve_dense(problem: NTKProblem, y: Tensor, ridge: float, chunk_size: int | None) -> Tensor:
    """α = (Θ + ridge·I)⁻¹ y by an eigendecomposition, which also tells whether the system is numerically singular
    (a Cholesky of a PSD matrix with a tiny pivot succeeds and returns garbage)."""
    rows = _rows(problem)
    system = _dense_kernel(problem, chunk_size) + ridge * torch.eye(
        rows, dtype=problem.out_dtype, device=problem.device
    )
    lam, vectors = torch.linalg.eigh(system.to(accumulation_dtype(system.dtype)))
    if lam[0] <= _singular_below(lam[-1].item(), rows, problem.out_dtype):
        raise ValueError(
            f"Θ(x_train, x_train) + ridge·I is numerically singular with ridge={ridge} (eigenvalues from "
            f"{lam[0].item():.3g} to {lam[-1].item():.3g}).{_rank_hint(problem)} Pass a larger ridge > 0, e.g. "
            f"ridge={1e-6 * max(lam[-1].item(), 1e-300):.2g} (1e-6 of the largest eigenvalue)."
        )
    return (vectors @ ((vectors.T @ y.reshape(rows).to(lam.dtype)) / lam)).to(problem.out_dtype)


def _solve_cg(
    problem: NTKProblem, y: Tensor, ridge: float, tol: float, maxiter: int | None, chunk_size: int | None
) -> Tensor:
    operator = _KernelOperator(problem, chunk_size, shift=ridge)
    rhs = y.reshape(-1).to("cpu", torch.float64).numpy()
    # Θ·v is computed in the model's dtype: no residual much below its rounding is reachable (float32: ~1e-6).
    eps = torch.finfo(problem.out_dtype).eps
    target = max(tol, 10 * eps)
    alpha, info = spla.cg(operator, rhs, rtol=target, atol=0.0, maxiter=maxiter)
    # scipy stops on its running residual, which drifts from the true one on a (nearly) singular system: CG
    # returned predictions 1e3 times too large with info=0 (a duplicated example with two targets, ridge=1e-20).
    # The true residual is computed once more (one NTK-vector product).
    residual = np.linalg.norm(rhs - operator.matvec(alpha)) / max(np.linalg.norm(rhs), 1e-300)
    if residual <= 10 * target:
        return torch.as_tensor(alpha, dtype=problem.out_dtype, device=problem.device)
    why = f"it stopped after maxiter={info} iterations" if info > 0 else "its running estimate reached tol"
    if not residual <= math.sqrt(eps):
        raise RuntimeError(
            f"conjugate gradients did not solve (Θ(x_train, x_train) + ridge·I) α = y: {why}, but the true relative "
            f"residual is {residual:.2e} (tol={tol}). With ridge={ridge} the system is singular or ill-conditioned. "
            "Pass a larger ridge > 0, a larger tol or maxiter, or method='dense' if the kernel fits in memory."
        )
    warn(
        f"conjugate gradients reached a true relative residual of {residual:.2e}, not tol={target:.1e} ({why}): "
        f"the {problem.out_dtype} kernel products' rounding on an ill-conditioned system (ridge={ridge}). The "
        "predictions carry errors of about that size; a larger ridge or a float64 model solves tighter."
    )
    return torch.as_tensor(alpha, dtype=problem.out_dtype, device=problem.device)


@caller_state_set_aside
@in_kernel_precision
@model_kept_as_it_was
def kernel_regression(
    model: nn.Module,
    x_train: Inputs,
    y_train: Tensor,
    x_test: Inputs,
    *,
    ridge: float = 0.0,
    params: ParamSelection = None,
    method: str = "auto",
    tol: float = 1e-10,
    maxiter: int | None = None,
    chunk_size: int | None = None,
) -> Tensor:
    """NTK ridge-regression mean prediction Θ(x_test, x_train) (Θ(x_train, x_train) + ridge·I)⁻¹ y_train.

    Kernels are the full ``N·O × N·O`` ones (every output pair), as in :func:`torchntk.ntk`.

    Args:
        model, params, chunk_size: as in :func:`torchntk.ntk`.
        x_train: ``Tensor[N_train, ...]`` (or a tuple); ``x_test``: ``Tensor[N_test, ...]`` with the same example shape.
        y_train: ``Tensor[N_train, *out]``, shaped like the model's output for ``x_train``.
        ridge: ``>= 0``, added to the diagonal of Θ(x_train, x_train). ``ridge=0`` needs a nonsingular kernel.
        method: ``"cg"`` (scipy conjugate gradients on a ``LinearOperator`` calling :func:`torchntk.ntk_vp`; never
            builds a kernel), ``"dense"`` (builds Θ(x_train, x_train), solves by ``torch.linalg.eigh``), or ``"auto"``:
            dense when ``N_train·O <= DENSE_MAX_ROWS`` (2048). Either way the prediction is one more ``ntk_vp``.
        tol: CG's stopping relative residual ``|y - (Θ + ridge·I) α| / |y|``, in (0, 1), at least ``10·eps`` of
            the model's dtype (float32: 1.2e-6; its products round there). The true residual is checked after CG (one
            more NTK-vector product): up to ``10·tol`` the answer is returned; up to ``sqrt(eps)`` (float32: 3.5e-4,
            float64: 1.5e-8) with a ``RuntimeWarning`` giving it; above, a ``RuntimeError``. Ignored by ``"dense"``.
        maxiter: CG's iteration limit; ``None`` is scipy's ``10·N_train·O``.

    Returns:
        ``Tensor[N_test, *out]`` in the output's dtype on the model's device.

    Raises:
        ValueError: bad arguments, or (dense) Θ + ridge·I numerically singular — pass ``ridge > 0``.
        RuntimeError: CG did not converge — the kernel is singular or ill-conditioned; pass ``ridge > 0``.
    """
    train = _prepare(model, x_train, None, params, ("x_train", "x_train"))
    _check_regression(train, y_train, ridge, tol, maxiter)
    test = _prepare(model, x_test, train.x1, params, ("x_test", "x_train"))  # checks x_test against x_train
    y = y_train.to(dtype=train.out_dtype, device=train.device)
    if _use_dense(method, ("cg", "dense"), _rows(train)):
        alpha = _solve_dense(train, y, ridge, chunk_size)
    else:
        alpha = _solve_cg(train, y, ridge, tol, maxiter, chunk_size)
    alpha = alpha.reshape(train.n1, *train.out_shape)
    # the prepared inputs (a dataset's columns, read once more only where a tile needs them)
    try:
        return ntk_vp(model, test.x1, train.x1, alpha, params=train.params, chunk_size=chunk_size, progress=False)
    except UnsupportedModelError:
        # forward mode cannot run on this model (an EmbeddingBag, a lookup scaled by counts): refused only here,
        # after the dense solve, the prediction takes Θ(x_test, x_train) from the kernel, some test rows at a time
        return _predicted_by_kernel(test, train, alpha, chunk_size)


def _predicted_by_kernel(test: NTKProblem, train: NTKProblem, alpha: Tensor, chunk_size: int | None) -> Tensor:
    """``Θ(x_test, x_train)·α`` from :func:`torchntk.ntk` (auto), ``DENSE_MAX_ROWS²`` kernel entries at a time."""
    rows = _rows(train)
    per_example = rows * max(1, rows // train.n1)
    step = max(1, DENSE_MAX_ROWS * DENSE_MAX_ROWS // per_example)
    weights = alpha.reshape(rows)
    parts = []
    for start in range(0, test.n1, step):
        x = tuple(t[start : start + step] for t in test.x1)
        kernel = _as_matrix(ntk(test.model, x, train.x1, params=train.params, chunk_size=chunk_size, distributed=False))
        parts.append((kernel @ weights.to(kernel.dtype)).reshape(-1, *train.out_shape))
    return torch.cat(parts)
