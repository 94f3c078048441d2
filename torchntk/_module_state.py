"""The attributes of a model's modules: what a forward must not change, and what torchntk puts back.

torchntk differentiates a model by swapping its parameters functionally and running its forward, which may assign
to its own modules' attributes. Hostile probing found three ways that goes wrong, silently:

- **State the forward moves.** A data-dependent initialisation (``if not self.initialized: self.bias.data.copy_(
  ...); self.initialized = True``, Glow's ActNorm), or a cache filled on the first call (``if self._w is None:
  self._w = self.lin.weight * 2``): the check's own forward initialised the model from two examples, or stored a
  tensor without a graph that broke the user's training for good. Refused (and put back) by
  :func:`refuse_moved_state`, with the fix.
- **Tensors computed from the parameters outside forward** (``self.dec_w = self.enc.weight[:]``, a tied view, or a
  cache filled before the call): a functional swap of the parameters does not reach them, so their path is missing
  from the kernel (10-96% off). Refused by :func:`refuse_tensors_derived_from_parameters`.
- **Attributes a forward recomputes each call** (the old ``torch.nn.utils.weight_norm`` hook assigns ``weight``):
  left holding torch.func's wrapped tensors after a call (``torch.save`` and ``backward`` then failed). Every call
  puts back what it found (:func:`kept_as_it_was`).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from torch import nn

# nn.Module's own bookkeeping (parameters, buffers, submodules and hooks are followed elsewhere)
_BOOKKEEPING = frozenset(vars(nn.Module()))
_MISSING = object()

F = TypeVar("F", bound=Callable[..., Any])


@dataclass
class Changes:
    """What a forward changed, found when :func:`kept_as_it_was` puts it back: ``moved``, attributes that are not
    tensors before and after (a flag, a counter, a cache filled); ``reassigned``, tensors replaced by tensors."""

    moved: list[str] = field(default_factory=list)
    reassigned: set[str] = field(default_factory=set)


def _attributes(model: nn.Module) -> dict[tuple[str, str], tuple[nn.Module, Any]]:
    found = {}
    for prefix, module in model.named_modules(remove_duplicate=True):
        for name, value in vars(module).items():
            if name not in _BOOKKEEPING:
                found[(prefix, name)] = (module, value)
    return found


@contextlib.contextmanager
def kept_as_it_was(model: nn.Module) -> Iterator[Changes]:
    """Run the body, then put every module attribute back as it was (added ones removed); the yielded
    :class:`Changes` says what the body changed."""
    before = _attributes(model)
    changes = Changes()
    try:
        yield changes
    finally:
        after = _attributes(model)
        for key in before.keys() | after.keys():
            old, new = before.get(key, (None, _MISSING))[1], after.get(key, (None, _MISSING))[1]
            if _same(old, new):
                continue
            owner, name = (before.get(key) or after[key])[0], ".".join(p for p in key if p)
            if isinstance(old, torch.Tensor) and isinstance(new, torch.Tensor):
                changes.reassigned.add(name)
            else:
                changes.moved.append(name)
            if old is _MISSING:
                del owner.__dict__[key[1]]
            else:
                owner.__dict__[key[1]] = old


def _same(old: Any, new: Any) -> bool:
    """The same object, or equal plain values (``self.shape = x.shape`` assigns an equal tuple each call)."""
    if old is new:
        return True
    if isinstance(old, torch.Tensor) or isinstance(new, torch.Tensor) or type(old) is not type(new):
        return False
    try:
        return bool(old == new)
    except Exception:  # noqa: BLE001 - values without a plain equality count as changed
        return False


def model_kept_as_it_was(fn: F) -> F:
    """Decorate a public entry point whose first argument is the model: its module attributes are put back after
    the call (:func:`kept_as_it_was`)."""

    @functools.wraps(fn)
    def wrapper(model: Any, *args: Any, **kwargs: Any) -> Any:
        if not isinstance(model, nn.Module):
            return fn(model, *args, **kwargs)
        with kept_as_it_was(model):
            return fn(model, *args, **kwargs)

    return wrapper  # type: ignore[return-value]


def refuse_moved_state(changes: Changes) -> None:
    """``ValueError`` when a forward changed attributes that are not tensors (put back already)."""
    if changes.moved:
        raise ValueError(
            f"the model's forward changes its own attributes ({', '.join(changes.moved[:3])}): a flag of a "
            "data-dependent initialisation (ActNorm's `initialized`), a counter or a cache filled on the first call. "
            "torchntk's check ran on two examples and put them back; the NTK is of a fixed function. Run the model "
            "once yourself first (it then initialises on your data), or keep that state out of forward."
        )


def refuse_tensors_derived_from_parameters(model: nn.Module, recomputed: set[str]) -> None:
    """``ValueError`` naming tensor attributes that hold a graph back to the parameters (``grad_fn`` set) and that the
    forward does not recompute (``recomputed``, from :class:`Changes`): the NTK would miss their path."""
    derived = [
        name
        for (prefix, attr), (_, value) in _attributes(model).items()
        if isinstance(value, torch.Tensor)
        and value.grad_fn is not None
        and (name := ".".join(p for p in (prefix, attr) if p)) not in recomputed
    ]
    if derived:
        raise ValueError(
            f"module attributes {derived[:3]} are tensors computed from the parameters outside forward (they carry a "
            "grad_fn: a tied view such as self.dec_w = self.enc.weight[:], or a cache filled earlier). torchntk "
            "swaps the parameters functionally and cannot follow such a tensor back to them, so the NTK would miss "
            "its path. Compute it inside forward (or register the shared tensor as one Parameter used twice)."
        )
