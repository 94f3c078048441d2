"""Embedding lookups whose torch backward is not the derivative of their forward.

torch's backward of ``embedding(weight, ids, padding_idx=p)`` leaves row ``p`` out of the gradient (it is never
trained), and with ``scale_grad_by_freq=True`` divides each row's gradient by the row's count in the example. The
NTK follows torch's backward (its J is what the backward computes, as the explicit-Jacobian oracle's), so:

- Jacobian contraction takes J from the backward and agrees;
- NTK-vector products push rows of Jᵀ forward through the plain lookup: a padding row is zero in those rows, so the
  kernel is still J·Jᵀ, but a count is not undone (refused, from the probe's record on the problem);
- structured derivatives convert the forward, which has no such argument (refused in the conversion).

:class:`LookupRecorder` finds them on one forward (the probe's), whether called by ``nn.Embedding``,
``nn.EmbeddingBag`` or ``F.embedding`` in the user's code.
"""

from __future__ import annotations

from typing import Any

from torch.utils._python_dispatch import TorchDispatchMode

#: aten lookups taking ``padding_idx`` / ``scale_grad_by_freq``.
EMBEDDING_OPS = frozenset({"embedding", "embedding_bag", "_embedding_bag", "_embedding_bag_forward_only"})


def schema_arguments(op: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """An aten overload's arguments by their schema names, defaults filled in."""
    schema = op._schema
    values = {a.name: a.default_value for a in schema.arguments if a.has_default_value()}
    values.update(zip((a.name for a in schema.arguments), args, strict=False))
    return values | dict(kwargs)


class LookupRecorder(TorchDispatchMode):
    """Records, while active, the lookups with ``scale_grad_by_freq=True`` (``scaled``: how many)."""

    def __init__(self) -> None:
        super().__init__()
        self.scaled = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.overloadpacket.__name__ in EMBEDDING_OPS and schema_arguments(func, args, kwargs).get(
            "scale_grad_by_freq"
        ):
            self.scaled += 1
        return func(*args, **kwargs)
