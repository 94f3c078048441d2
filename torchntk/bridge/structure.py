"""How a primitive's Jacobian ∂y/∂θ is stored: a small sub-array plus the structure that rebuilds it (paper App. E).

For each axis of ``y`` (after an optional cotangent *pullback*, see :class:`StructuredJacobian`) a
:class:`Structure` says one of

- ``b`` (an int): the axis is diagonal with θ's axis ``b`` (same size). If the sub-array also carries axis ``b`` the
  Jacobian is *block-diagonal* along it (the blocks differ); if not, *constant-block-diagonal* (``I ⊗ B``);
- :data:`FREE`: an ordinary axis, carried by the sub-array;
- :data:`TILED`: *output block-tiled*: ``y`` repeats along the axis (∂y/∂θ does not depend on it), so the
  cotangent is summed over it before any contraction.

A θ axis neither carried by the sub-array nor diagonal with a ``y`` axis is *input block-tiled*: ``y`` sums θ
over it, and a pair of such uses contributes its size as a factor.

The sub-array's axes are: the FREE ``y`` axes in order, then the carried θ axes in order. An *indexed* structure
(``indexed=b``, θ axis ``b`` the only one carried) stores a one-hot sub-array by its indices: an integer array of the
FREE axes whose entry is the position along ``b`` that the one is at (an embedding's lookup: tokens × vocabulary as
the token ids). A pair of indexed uses contracts the two one-hots as one equality of their indices
(:func:`torchntk.bridge.mjjmp.pair_contraction`), never building them.
"""

from __future__ import annotations

import string
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp

FREE = "free"
TILED = "tiled"

YAxis = int | str


@dataclass(frozen=True)
class Structure:
    """Static description of ∂y/∂θ; see the module docstring."""

    y_axes: tuple[YAxis, ...]
    theta_in_sub: tuple[bool, ...]
    indexed: int | None = None

    def __post_init__(self) -> None:
        if self.indexed is not None and self.carried_theta != (self.indexed,):
            raise ValueError(f"an indexed θ axis must be the only one carried in {self}")
        mapped = [axis for axis in self.y_axes if isinstance(axis, int)]
        if len(set(mapped)) != len(mapped):
            raise ValueError(f"a θ axis is diagonal with two y axes in {self}")
        if any(not 0 <= b < len(self.theta_in_sub) for b in mapped):
            raise ValueError(f"a y axis maps to a θ axis out of range in {self}")

    @property
    def free_y(self) -> tuple[int, ...]:
        """Positions of the FREE ``y`` axes."""
        return tuple(a for a, kind in enumerate(self.y_axes) if kind == FREE)

    @property
    def tiled_y(self) -> tuple[int, ...]:
        """Positions of the output block-tiled ``y`` axes."""
        return tuple(a for a, kind in enumerate(self.y_axes) if kind == TILED)

    @property
    def carried_theta(self) -> tuple[int, ...]:
        """θ axes carried by the sub-array."""
        return tuple(b for b, carried in enumerate(self.theta_in_sub) if carried)

    def sub_shape(self, y_shape: tuple[int, ...], theta_shape: tuple[int, ...]) -> tuple[int, ...]:
        """Shape the sub-array must have (an indexed one: without the indexed axis)."""
        carried = () if self.indexed is not None else tuple(theta_shape[b] for b in self.carried_theta)
        return tuple(y_shape[a] for a in self.free_y) + carried

    @classmethod
    def identity(cls, ndim: int) -> Structure:
        """``y = c · θ`` elementwise: constant-block-diagonal along every axis."""
        return cls(tuple(range(ndim)), (False,) * ndim)

    @classmethod
    def dense(cls, y_ndim: int, theta_ndim: int) -> Structure:
        """No structure: the sub-array is the whole Jacobian ``(*y, *θ)``."""
        return cls((FREE,) * y_ndim, (True,) * theta_ndim)


@dataclass
class StructuredJacobian:
    """The output of a structure rule.

    ``pullback``, when given, maps a cotangent of ``y`` (shape ``y``) to a cotangent with the axes that
    ``structure.y_axes`` describes: ∂f/∂y · ∂y/∂θ = pullback(∂f/∂y) · (Jacobian described by ``structure``). It
    lets bijective relabelings (reshape, rev, pad, …) be expressed as constant-block-diagonal along θ's axes.
    """

    structure: Structure
    sub: Any
    pullback: Callable[[Any], Any] | None = None


def to_dense(jac: StructuredJacobian, y_shape: tuple[int, ...], theta_shape: tuple[int, ...]) -> Any:
    """Rebuild the full Jacobian ``(*y', *θ)`` (``y'`` = pulled-back ``y``) from its structured form; for tests."""
    s = jac.structure
    if s.indexed is not None:  # the one-hot, built
        one_hot = jax.nn.one_hot(jac.sub, theta_shape[s.indexed], dtype=jnp.result_type(float))
        jac = StructuredJacobian(Structure(s.y_axes, s.theta_in_sub), one_hot, jac.pullback)
        s = jac.structure
    letters = iter(string.ascii_letters)
    theta_letters = [next(letters) for _ in theta_shape]
    y_letters = [next(letters) for _ in y_shape]
    operands, subscripts = (
        [jac.sub],
        ["".join([y_letters[a] for a in s.free_y] + [theta_letters[b] for b in s.carried_theta])],
    )
    for a, kind in enumerate(s.y_axes):
        if isinstance(kind, int):  # diagonal pair: an identity ties the two letters
            operands.append(jnp.eye(y_shape[a], dtype=jac.sub.dtype))
            subscripts.append(y_letters[a] + theta_letters[kind])
        elif kind == TILED:
            operands.append(jnp.ones(y_shape[a], dtype=jac.sub.dtype))
            subscripts.append(y_letters[a])
    mapped = {kind for kind in s.y_axes if isinstance(kind, int)}
    for b, carried in enumerate(s.theta_in_sub):
        if not carried and b not in mapped:  # input block-tiled
            operands.append(jnp.ones(theta_shape[b], dtype=jac.sub.dtype))
            subscripts.append(theta_letters[b])
    spec = ",".join(subscripts) + "->" + "".join(y_letters + theta_letters)
    return jnp.einsum(spec, *operands)
