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
- writes by integer index (``scatter``, ``index_put`` as in ``y[idx] = h``, ``index_copy``, ``put``): with duplicate
  indices the forward keeps one write and the backward gives every duplicate its gradient (0.35 off).

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
INDEX_WRITES = frozenset({"scatter", "scatter_", "index_put", "index_put_", "_index_put_impl_", "index_copy"})
INDEX_WRITES |= {"index_copy_", "put", "put_"}


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


def _by_integer_index(name: str, arguments: dict[str, Any]) -> bool:
    if name.startswith("scatter"):
        return isinstance(arguments.get("src"), torch.Tensor)  # scatter.value writes a number: no gradient
    if name.startswith(("index_put", "_index_put")):
        indices = [i for i in arguments.get("indices", ()) if isinstance(i, torch.Tensor)]
        return any(not (i.dtype is torch.bool or i.dtype is torch.uint8) for i in indices)  # a mask repeats none
    if name.startswith("put"):
        return not arguments.get("accumulate", False)
    return True


class BackwardConventions(TorchDispatchMode):
    """While active, records the ops of the module docstring; ``parameters``: the tensors θ is read from."""

    def __init__(self, parameters: Iterable[torch.Tensor]) -> None:
        super().__init__()
        self.parameters = {key for t in parameters if (key := _key(t)) is not None}
        self.scaled_lookups = 0
        self.padded: set[tuple[Any, ...]] = set()  # weights looked up with a padding index
        self.read: set[tuple[Any, ...]] = set()  # tensors every other op reads
        self.index_writes: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        arguments = schema_arguments(func, args, kwargs)
        weight = None
        if name in EMBEDDING_OPS:
            weight = arguments.get("weight")
            self.scaled_lookups += bool(arguments.get("scale_grad_by_freq"))
            padding = arguments.get("padding_idx")
            if padding is not None and padding >= 0:
                self.padded.add(_key(weight))  # None (no storage): not a parameter, so refused below
        elif name in INDEX_WRITES and _by_integer_index(name, arguments):
            self.index_writes.add(name)
        for t in tree_leaves((args, kwargs)):
            if isinstance(t, torch.Tensor) and t is not weight and (key := _key(t)) is not None:
                self.read.add(key)
        return func(*args, **kwargs)

    def forward_mode_differs(self) -> tuple[str, ...]:
        """What makes forward mode follow another derivative than torch's backward, described; ``()`` if nothing."""
        found = []
        if self.scaled_lookups:
            found.append("an embedding lookup with scale_grad_by_freq=True (its backward divides by each id's count)")
        if any(key not in self.parameters or key in self.read for key in self.padded):
            found.append(
                "an embedding lookup with padding_idx of a weight that is also read elsewhere (tied to an output "
                "head) or computed (its backward leaves the padding row out, forward mode does not)"
            )
        if self.index_writes:
            found.append(
                f"writes by integer index ({', '.join(sorted(self.index_writes))}: y[idx] = h, scatter), whose "
                "backward gives every duplicate index its gradient where the forward keeps one write"
            )
        return tuple(found)
