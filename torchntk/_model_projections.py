"""What the model computes on a problem's examples, in a few numbers kept in a store's header: random projections
of its outputs and of its Jacobian (by torch's backward). The architecture fingerprint reads code statically and
misses some changes (a helper module's constant read through ``getattr``); these catch what changes the outputs or
the gradient on the examples, so that a resumed store never serves another model's tiles."""

from __future__ import annotations

import threading
from typing import Any

import torch

from torchntk._precision import float32_throughout
from torchntk._problem import NTKProblem

# Random projections kept in a store's header, and the examples per forward and backward computing them (a backward
# holds their activations).
_PROJECTIONS, _PROJECTION_CHUNK = 4, 8
# float32: a 3e-4 change of the outputs' scale passed 1e-4 (the resumed kernel 6e-4 off, a fresh one 1.5e-7), and a
# 1e-4 change of the gradient's passed 1e-5 (3.3e-5 off); resnet18's projections moved by 2e-9 with the thread count
_PROJECTION_TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-6}
_PROJECTION_TOLERANCE_16_BITS = 3e-3


def output_projections(problem: NTKProblem) -> dict[str, Any]:
    """What the model computes on this problem's examples, in a few numbers: ``Σ w·f(x)`` for fixed random ``w``
    over every output of ``x1`` (and ``x2``), with the outputs' largest magnitude and count. The fingerprint reads
    code statically and misses some changes (a helper module's constant read through ``getattr``): a store resumed
    after one served the old model's tiles (0.89 off). And of its Jacobian, for changes of the gradient alone. One
    forward and backward over the examples, once per call (kept on ``problem``: distributed ranks compare them
    before a store's header holds them)."""
    with _COMPUTING:  # the backward swaps the model's parameters: threads opening one store took each other's
        known = problem.__dict__.get("_output_projections")
        if known is None:
            known = _projections(problem)
            object.__setattr__(problem, "_output_projections", known)  # a frozen dataclass: a memo, not a field
    return known


_COMPUTING = threading.Lock()


def _projections(problem: NTKProblem) -> dict[str, Any]:
    """``Σ w·f(x)`` over every output of every example, and ``Σ_n u_n·J(x_n)·r_k`` by torch's backward for fixed
    random ``u`` and θ-directions ``r_k``, with the L2 norm of the ``g_p r_kp`` terms (their rounding's scale). Every
    example counts: a change of the gradient alone (a straight-through scale, ``(h - h·s).detach() + h·s``, read where
    the fingerprint cannot see) kept a store's old tiles (0.71 off, 0.63 with both models' tiles mixed), and one on
    examples after the fourth when only the first four were projected (0.44)."""
    generator = torch.Generator().manual_seed(20261204)
    sums = torch.zeros(_PROJECTIONS, dtype=torch.float64)
    largest, count = 0.0, 0
    gradient = {name: torch.zeros(p.shape, dtype=torch.float64) for name, p in problem.params.items()}

    def output_weights(out: torch.Tensor) -> list[torch.Tensor]:  # the outputs projected; their cotangent drawn
        nonlocal largest, count
        flat = out.to("cpu", torch.float64).reshape(1, -1)
        weights = torch.randn(_PROJECTIONS + 1, flat.shape[1], generator=generator, dtype=torch.float64)
        sums.add_((weights[:_PROJECTIONS] * flat).sum(1))
        largest, count = max(largest, float(flat.abs().max())), count + flat.shape[1]
        return [weights[_PROJECTIONS].reshape(out.shape)]

    for batch in (problem.x1,) if problem.x2 is None else (problem.x1, problem.x2):
        for start in range(0, batch[0].shape[0], _PROJECTION_CHUNK):
            with float32_throughout():
                _, (g,) = problem.pulled_back(
                    tuple(x[start : start + _PROJECTION_CHUNK] for x in batch), output_weights
                )
            for name in gradient:
                gradient[name] += g[name].to("cpu", torch.float64)
    projections, scale = [], 0.0
    for _ in range(_PROJECTIONS):
        terms = torch.cat(
            [
                (g * torch.randn(g.shape, generator=generator, dtype=torch.float64)).reshape(-1)
                for g in gradient.values()
            ]
        )
        projections.append(float(terms.sum()))
        scale = max(scale, float(torch.linalg.vector_norm(terms)))
    jacobian = {"projections": projections, "scale": scale}
    return {"projections": sums.tolist(), "largest": largest, "count": count, "jacobian": jacobian}


def same_outputs(saved: Any, wanted: dict[str, Any], dtype: torch.dtype) -> bool:
    """Projections equal to rounding: a sum of ``count`` terms each off by ``tolerance · largest`` at most; the
    Jacobian's within ``tolerance`` of its terms' L2 norm (a 1e-4 change of a float32 gradient passed a bound on
    their magnitudes' sum, the resumed kernel 3.3e-5 off against 8e-8 fresh)."""
    if not isinstance(saved, dict) or saved.get("count") != wanted["count"]:
        return False
    tolerance = _PROJECTION_TOLERANCE.get(dtype, _PROJECTION_TOLERANCE_16_BITS)
    bound = tolerance * max(wanted["largest"], 1e-30) * 4 * wanted["count"] ** 0.5
    pairs = zip(saved.get("projections", []), wanted["projections"], strict=False)
    if len(saved.get("projections", [])) != _PROJECTIONS or not all(abs(a - b) <= bound for a, b in pairs):
        return False
    jacobian, wanted_jacobian = saved.get("jacobian"), wanted["jacobian"]
    if not isinstance(jacobian, dict) or len(jacobian.get("projections", [])) != _PROJECTIONS:
        return False
    bound = 4 * tolerance * max(wanted_jacobian["scale"], 1e-300)
    pairs = zip(jacobian["projections"], wanted_jacobian["projections"], strict=True)
    return all(isinstance(a, float) and abs(a - b) <= bound for a, b in pairs)
