"""The explicit-Jacobian oracle every NTK path is tested against.

Jacobians by ``torch.autograd.functional.jacobian``; trace and diagonal axes applied index by index, written
independently of ``torchntk._axes`` so that a layout bug cannot hide in both.
"""

from __future__ import annotations

import itertools
from copy import deepcopy

import torch
from torch import Tensor, nn


def full_jacobian(model: nn.Module, names: list[str], inputs: tuple[Tensor, ...]) -> Tensor:
    """∂f/∂θ for the named parameters: ``Tensor[N, *out, P]``."""
    # A disposable copy whose parameter slots are emptied and refilled by hand: independent of functional_call.
    copy = deepcopy(model)
    named = dict(copy.named_parameters())
    values = tuple(named[n].detach().clone() for n in names)
    holders: dict[int, list[tuple[nn.Module, str]]] = {}
    for module in copy.modules():
        for attr, p in list(module._parameters.items()):
            if p is not None:
                holders.setdefault(id(p), []).append((module, attr))
    slots = [holders[id(named[n])] for n in names]
    for slot in slots:
        for module, attr in slot:
            del module._parameters[attr]

    def f(*theta: Tensor) -> Tensor:
        for slot, value in zip(slots, theta, strict=True):
            for module, attr in slot:
                setattr(module, attr, value)
        return copy(*inputs)

    out = f(*values)
    jac = torch.autograd.functional.jacobian(f, values)
    return torch.cat([j.reshape(*out.shape, -1) for j in jac], dim=-1)


def reduce_kernel(full: Tensor, trace_axes: tuple[int, ...], diagonal_axes: tuple[int, ...]) -> Tensor:
    """From ``full[N1, *out, N2, *out]`` to the kernel layout, by explicit loops over indices (tiny shapes only)."""
    ndim = full.ndim // 2
    shape1, shape2 = full.shape[:ndim], full.shape[ndim:]
    trace = [a % ndim for a in trace_axes]
    diag = [a % ndim for a in diagonal_axes]
    result_shape = []
    for axis in range(ndim):
        if axis in diag:
            result_shape.append(shape1[axis])
        elif axis not in trace:
            result_shape += [shape1[axis], shape2[axis]]
    result = torch.zeros(result_shape, dtype=full.dtype)
    kept = [a for a in range(ndim) if a not in trace]
    ranges = []
    for axis in kept:
        ranges.append(range(shape1[axis]))
        if axis not in diag:
            ranges.append(range(shape2[axis]))
    traced_ranges = [range(shape1[a]) for a in trace]
    size = 1
    for a in trace:
        size *= shape1[a]
    for res_index in itertools.product(*ranges):
        it = iter(res_index)
        i1, i2 = [0] * ndim, [0] * ndim
        for axis in kept:
            i1[axis] = next(it)
            i2[axis] = i1[axis] if axis in diag else next(it)
        total = 0.0
        for t_index in itertools.product(*traced_ranges):
            for axis, value in zip(trace, t_index, strict=True):
                i1[axis] = i2[axis] = value
            total = total + full[tuple(i1) + tuple(i2)]
        result[res_index] = total / size
    return result


def oracle_ntk(
    model: nn.Module,
    x1: tuple[Tensor, ...],
    x2: tuple[Tensor, ...] | None,
    *,
    names: list[str] | None = None,
    trace_axes: tuple[int, ...] = (),
    diagonal_axes: tuple[int, ...] = (),
) -> Tensor:
    """The NTK from explicit Jacobians, in torchntk's layout."""
    names = names or [n for n, p in model.named_parameters() if p.requires_grad]
    j1 = full_jacobian(model, names, x1)
    j2 = j1 if x2 is None else full_jacobian(model, names, x2)
    full = torch.tensordot(j1, j2, dims=([-1], [-1]))
    return reduce_kernel(full, trace_axes, diagonal_axes)
