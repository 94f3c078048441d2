"""Ops whose torch backward is not the derivative of their forward on some inputs, seen on one forward.

The NTK follows torch's backward (its J is what the backward computes, as the explicit-Jacobian oracle's). Jacobian
contraction takes J from that backward and agrees; NTK-vector products push rows of Jᵀ forward by forward mode,
which follows the forward; structured derivatives convert the forward. Where the two differ only on some input
values, a numerical check on a few examples cannot be relied on (the values may come later), so the ops are found
by name on the probe's first forward (:class:`BackwardConventions`, a dispatch mode: whether called by a module or
functionally):

- ``embedding(weight, ids, padding_idx=p)``: the backward leaves row p out of the gradient (never trained). Forward
  mode is still right where row p of every tangent is zero: the weight is a parameter that nothing else reads.
  Tied to an output head, or computed (a parametrization), it is not (a kernel silently off);
- ``scale_grad_by_freq=True``: the backward divides each row's gradient by its count in the example;
- writes by integer index (``scatter``, ``index_put`` as in ``y[idx] = h``, ``index_copy``, ``put``) of values the
  parameters reach: with duplicate indices the forward keeps one write and the backward gives every duplicate its
  gradient (0.35 off). Adding writes (``accumulate=True``) and writes of constants are consistent, and kept.

Structured derivatives refuse the lookups in the conversion (:func:`torchntk.converters.onnx_export`), where the
exported graph shows them.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

#: aten lookups taking ``padding_idx`` / ``scale_grad_by_freq``.
EMBEDDING_OPS = frozenset({"embedding", "embedding_bag", "_embedding_bag", "_embedding_bag_forward_only"})
#: aten writes of values at integer indices, where duplicates keep one write.
INDEX_WRITES = frozenset({"scatter", "index_put", "_index_put_impl", "index_copy", "put"})  # and in place: name_


def schema_arguments(op: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """An aten overload's arguments by their schema names, defaults filled in."""
    schema = op._schema
    values = {a.name: a.default_value for a in schema.arguments if a.has_default_value()}
    values.update(zip((a.name for a in schema.arguments), args, strict=False))
    return values | dict(kwargs)


def _key(t: torch.Tensor) -> tuple[Any, ...] | None:
    """The memory a tensor views (two Python objects of one parameter agree); ``None`` for a tensor without strided
    storage (a nested tensor of the transformer fast path, a sparse one): never a parameter."""
    if t.is_nested or t.layout != torch.strided:
        return None
    try:
        return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()))
    except RuntimeError:  # a tensor subclass or wrapper without storage
        return None


#: The argument of each index write that holds the values written.
_WRITTEN = {
    "scatter": "src",
    "index_put": "values",
    "_index_put_impl": "values",
    "index_copy": "source",
    "put": "source",
}


def _written_values(name: str, arguments: dict[str, Any]) -> torch.Tensor | None:
    """The values an index write keeps one of where indices repeat: ``None`` where none can repeat (boolean masks),
    where repeats add up (``accumulate=True``) or where a number is written (no gradient)."""
    if arguments.get("accumulate", False):
        return None
    if name.startswith(("index_put", "_index_put")):
        indices = [i for i in arguments.get("indices", ()) if isinstance(i, torch.Tensor)]
        if all(i.dtype is torch.bool or i.dtype is torch.uint8 for i in indices):  # a mask repeats no position
            return None
    values = arguments.get(_WRITTEN[name.rstrip("_")])
    return values if isinstance(values, torch.Tensor) else None


class BackwardConventions(TorchDispatchMode):
    """While active, records the ops of the module docstring; ``parameters``: the tensors θ is read from. What the
    parameters reach is followed op by op (``derived``): an index write of values no parameter reaches (zeros, a
    one-hot of constants) has no derivative to differ."""

    def __init__(self, parameters: Iterable[torch.Tensor]) -> None:
        super().__init__()
        self.parameters = {key for t in parameters if (key := _key(t)) is not None}
        self.derived = set(self.parameters)  # tensors computed from the parameters
        self.scaled_lookups = 0
        self.lookups: dict[Any, set[Any]] = {}  # weight -> the padding indices it is looked up with (None: none)
        self.read: set[tuple[Any, ...]] = set()  # tensors read by ops other than lookups (as their weight)
        self.index_writes: set[str] = set()
        self.derived_dtypes: set[torch.dtype] = set()  # floating dtypes of what the parameters reach (a bf16 cast)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        arguments = schema_arguments(func, args, kwargs)
        weight = None
        if name in EMBEDDING_OPS:
            weight = arguments.get("weight")
            self.scaled_lookups += bool(arguments.get("scale_grad_by_freq"))
            padding = arguments.get("padding_idx")
            padding = padding if padding is not None and padding >= 0 else None
            self.lookups.setdefault(_key(weight), set()).add(padding)  # key None: not a parameter, refused below
        elif name.rstrip("_") in INDEX_WRITES:
            values = _written_values(name, arguments)
            if values is not None and _key(values) in self.derived:
                self.index_writes.add(name)
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        keys = [_key(t) for t in tensors]
        self.read.update(key for t, key in zip(tensors, keys, strict=True) if t is not weight and key is not None)
        out = func(*args, **kwargs)
        if any(key in self.derived for key in keys if key is not None):
            outputs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
            self.derived.update(key for t in outputs if (key := _key(t)))
            self.derived_dtypes.update(t.dtype for t in outputs if t.is_floating_point())
        return out

    def forward_mode_differs(self) -> tuple[str, ...]:
        """What makes forward mode follow another derivative than torch's backward, described; ``()`` if nothing."""
        found = []
        if self.scaled_lookups:
            found.append("an embedding lookup with scale_grad_by_freq=True (its backward divides by each id's count)")
        padded = [(key, paddings) for key, paddings in self.lookups.items() if paddings - {None}]
        if any(key not in self.parameters or key in self.read or len(paddings) > 1 for key, paddings in padded):
            found.append(
                "an embedding lookup with padding_idx of a weight that is also read elsewhere (tied to an output "
                "head, looked up without it or with another) or computed (its backward leaves the padding row "
                "out, forward mode does not)"
            )
        if self.index_writes:
            found.append(
                f"writes by integer index ({', '.join(sorted(self.index_writes))}: y[idx] = h, scatter), whose "
                "backward gives every duplicate index its gradient where the forward keeps one write"
            )
        return tuple(found)
