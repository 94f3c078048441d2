"""Helpers for the converter tests: fidelity against torch and linearized-jaxpr primitives."""

from __future__ import annotations

import time

import jax
import jax.extend
import numpy as np
import torch

from torchntk.converters import JaxModel, to_jax


def rel_err(got, want) -> float:
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, (got.shape, want.shape)
    return float(np.abs(got - want).max() / (np.abs(want).max() + 1e-30))


def check_fidelity(
    model: torch.nn.Module,
    inputs: tuple[torch.Tensor, ...],
    *,
    route: str = "onnx-tf",
    out_tol: float = 1e-5,
    grad_tol: float = 1e-4,
    params=None,
) -> tuple[JaxModel, dict[str, float]]:
    """Convert ``model`` and compare with torch on the first example: output, and the VJP with respect to every
    selected parameter for a random cotangent. Returns the JaxModel and measured errors / first-call seconds."""
    jm = to_jax(model, inputs, params=params, route=route)
    x0 = tuple(x[:1] for x in inputs)
    own = dict(model.named_parameters())
    # A plain forward, not functional_call (which corrupts models with tied weights in torch 2.14); values given
    # through ``params={name: tensor}`` are not what torch computes with here, so only names/lists are supported.
    assert params is None or not isinstance(params, dict)
    out = model(*x0)[0]
    cot = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(1))
    grads = torch.autograd.grad(out, [own[n] for n in jm.param_names], cot)

    xs = [jax.numpy.asarray(x[0].numpy()) for x in inputs]
    t = time.perf_counter()
    y, vjp = jax.vjp(lambda p: jm.fn(p, *xs), jm.params)
    (gj,) = vjp(jax.numpy.asarray(cot.numpy()))
    first_call = time.perf_counter() - t
    errors = {"out": rel_err(y, out.detach().numpy())}
    errors["grad"] = max(rel_err(gj[n], g.numpy()) for n, g in zip(jm.param_names, grads, strict=True))
    assert errors["out"] <= out_tol, errors
    for n, g in zip(jm.param_names, grads, strict=True):
        assert rel_err(gj[n], g.numpy()) <= grad_tol, (n, rel_err(gj[n], g.numpy()))
    errors["first_call"] = first_call
    return jm, errors


def linearized_primitives(jm: JaxModel, *xs) -> set[str]:
    """Primitive names of the linearized function ``params -> tangent output``, recursing into nested jaxprs."""
    _, lin = jax.linearize(lambda p: jm.fn(p, *xs), jm.params)
    names: set[str] = set()

    def visit(jaxpr) -> None:
        for eqn in jaxpr.eqns:
            names.add(eqn.primitive.name)
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                visit(getattr(sub, "jaxpr", sub))

    visit(jax.make_jaxpr(lin)(jm.params).jaxpr)
    return names
