"""The attributes of a model's modules: what torchntk puts back after every forward, and what it cannot follow.

torchntk differentiates a model by swapping its parameters functionally and running its forward, which may assign
to its own modules' attributes. Hostile probing found these going wrong, silently:

- **State a forward fills or logs.** A cache filled on the first call (``if self._w is None: self._w =
  self.lin.weight * 2``), a data-dependent initialisation kept in plain attributes, ``self.stats["h"] = h``,
  ``self.last_attn = attn``, or the old ``torch.nn.utils.weight_norm`` hook assigning ``weight``: the first
  forward's values were used by every later one (the kernel then missed the cache's path, 42% off) and the model
  was left holding torch.func's wrapped tensors (``torch.save`` failed). Now **every forward starts from the
  attributes as the caller left them and puts them back** (:func:`kept_as_it_was`, in
  ``_problem.functional_forward``; lists and dicts by content too): a cache is then recomputed from the swapped
  parameters on each forward, as a fresh model computes it; a data-dependent initialisation initialises on each
  batch, which the probe refuses as coupling; a log is left as it was.
- **Tensors computed from the parameters outside forward, or references to them** (``self.dec_w =
  self.enc.weight[:]``, ``self.ws = [self.l1.weight]``, a derived buffer, a class attribute, an attribute of a
  plain object the module holds): a functional swap of the parameters does not reach them, so their path is missing
  from the kernel (10-96% off). Refused by :func:`refuse_stale_tensors`, unless the forward recomputes them.
- **Writes into such tensors in place** (``self.scale.mul_(1.5)``): the probe runs on copies of them
  (:func:`tensor_attributes_copied`) and refuses, so the caller's stay as they were.
"""

from __future__ import annotations

import contextlib
import functools
import types
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from torch import nn

from torchntk._fingerprint import globals_loaded, installed_code, is_library, names_read

# nn.Module's own bookkeeping (parameters, buffers, submodules and hooks are followed elsewhere)
_BOOKKEEPING = frozenset(vars(nn.Module()))
_MISSING = object()

F = TypeVar("F", bound=Callable[..., Any])


@dataclass
class Changes:
    """The attributes a body changed (by assignment, or a list's or dict's contents), by dotted name."""

    changed: set[str] = field(default_factory=set)


def _name(prefix: str, attr: str) -> str:
    return f"{prefix}.{attr}" if prefix else attr


def _attributes(model: nn.Module) -> dict[str, tuple[nn.Module, str, Any]]:
    found = {}
    for prefix, module in model.named_modules(remove_duplicate=True):
        for attr, value in vars(module).items():
            if attr not in _BOOKKEEPING:
                found[_name(prefix, attr)] = (module, attr, value)
    return found


def _contents(value: Any) -> Any:
    """A shallow copy of a list's or dict's contents (what a forward may append to or set), else ``None``."""
    if type(value) is list:
        return list(value)
    if type(value) is dict:
        return dict(value)
    return None


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


def _same_contents(old: Any, new: Any) -> bool:
    if type(old) is list:
        return len(old) == len(new) and all(a is b for a, b in zip(old, new, strict=True))
    return old.keys() == new.keys() and all(old[k] is new[k] for k in old)


@contextlib.contextmanager
def kept_as_it_was(model: nn.Module) -> Iterator[Changes]:
    """Run the body, then put every module attribute back as it was (added ones removed, lists' and dicts'
    contents restored in place); the yielded :class:`Changes` says what the body changed."""
    before = _attributes(model)
    contents = {name: _contents(value) for name, (_, _, value) in before.items()}
    changes = Changes()
    try:
        yield changes
    finally:
        after = _attributes(model)
        for name in before.keys() | after.keys():
            module, attr, old = before.get(name) or (*after[name][:2], _MISSING)
            new = after[name][2] if name in after else _MISSING
            if not _same(old, new):
                changes.changed.add(name)
                if old is _MISSING:
                    del module.__dict__[attr]
                else:
                    module.__dict__[attr] = old
            saved = contents.get(name)
            if saved is not None and not _same_contents(saved, old):
                changes.changed.add(name)
                if type(old) is list:
                    old[:] = saved
                else:
                    old.clear()
                    old.update(saved)


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


def _held_tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor a module holds outside its parameters and buffers: attributes, and what they hold down to
    :data:`_NESTING` levels (list, tuple and dict items, plain objects' attributes, a partial's arguments, a
    function's closure cells), tensors on its (Python-defined) class, and module globals its methods read."""
    for name, (_, _, value) in _attributes(model).items():
        yield from _tensors_in(name, value)
    for name, _, _, value in _class_tensors(model) + _global_tensors(model):
        yield name, value
    for name, hook in _forward_hooks(model):  # a LoRA adapter applied by a hook's closure was a constant (0.14 off)
        yield from _tensors_in(name, hook)


def _forward_hooks(model: nn.Module) -> Iterator[tuple[str, Any]]:
    """The forward hooks and pre-hooks that run in the model's forward: each module's, and torch's global ones."""
    from torch.nn.modules import module as module_hooks

    for prefix, module in model.named_modules():
        for kind in ("_forward_pre_hooks", "_forward_hooks"):
            for key, hook in getattr(module, kind, {}).items():
                yield f"{_name(prefix, kind.strip('_'))}[{key}]", hook
    for kind in ("_global_forward_pre_hooks", "_global_forward_hooks"):
        for key, hook in getattr(module_hooks, kind, {}).items():
            yield f"torch.nn.modules.module.{kind}[{key}]", hook


_NESTING = 4  # levels of containers and objects followed: a parameter held in an object in a list was missed (0.35)


def _tensors_in(name: str, value: Any, depth: int = 0, seen: set[int] | None = None) -> Iterator[tuple[str, Any]]:
    seen = set() if seen is None else seen
    if isinstance(value, torch.Tensor):
        yield name, value
        return
    if depth >= _NESTING or id(value) in seen or isinstance(value, (nn.Module, str, bytes, type)):
        return
    seen.add(id(value))
    if isinstance(value, (list, tuple)):
        items = [(f"{name}[{i}]", item) for i, item in enumerate(value)]
    elif isinstance(value, dict):
        items = [(f"{name}[{key!r}]", item) for key, item in value.items()]
    elif isinstance(value, functools.partial):
        items = [(f"{name}.args", value.args), (f"{name}.keywords", value.keywords or {})]
    elif isinstance(value, types.FunctionType):
        cells = value.__closure__ or ()
        items = [(f"{name}.<default>", value.__defaults__ or ()), (f"{name}.<kwdefaults>", value.__kwdefaults__ or {})]
        for i, cell in enumerate(cells):
            try:
                items.append((f"{name}.<closure {i}>", cell.cell_contents))
            except ValueError:  # an empty cell
                continue
    elif isinstance(value, types.MethodType):  # a bound method (a hook of an adapter object): its object
        items = [(f"{name}.__self__", value.__self__), (f"{name}.__func__", value.__func__)]
    elif hasattr(value, "__dict__") and (
        isinstance(value, types.SimpleNamespace) or not is_library(type(value).__module__)
    ):
        items = [(f"{name}.{attr}", item) for attr, item in vars(value).items()]
    else:
        return
    for item_name, item in items:
        yield from _tensors_in(item_name, item, depth + 1, seen)


def _copyable(value: Any) -> bool:
    """A tensor, or a list, tuple or dict holding tensors: what :func:`_copied` copies."""
    if isinstance(value, torch.Tensor):
        return True
    items = value if type(value) in (list, tuple) else value.values() if type(value) is dict else ()
    return any(isinstance(v, torch.Tensor) for v in items)


def _copied(value: Any, memo: dict[int, torch.Tensor]) -> Any:
    """A copy of a :func:`_copyable` value (a tensor, or a list, tuple or dict with its tensors copied). ``memo`` (by
    the original's id) copies a tensor held in several places once, and keeps them one tensor: an 80 MB table held
    in six places took six copies."""

    def one(t: Any) -> Any:
        if not isinstance(t, torch.Tensor):
            return t
        if id(t) not in memo:
            memo[id(t)] = _copy(t)
        return memo[id(t)]

    if isinstance(value, torch.Tensor):
        return one(value)
    if type(value) is dict:
        return {k: one(v) for k, v in value.items()}
    return type(value)(one(v) for v in value)


def _python_classes(model: nn.Module) -> Iterator[tuple[str, type]]:
    """The Python-defined classes of the model's modules and their bases, once each, with a module's name."""
    seen: set[type] = set()
    for prefix, module in model.named_modules():
        for cls in type(module).__mro__:
            if cls not in seen and not is_library(cls.__module__):
                seen.add(cls)
                yield prefix, cls


#: Calls followed from the model's methods into the user's functions, for the tensors they read.
_CALL_DEPTH = 3

Place = tuple[str, dict[str, Any] | type | types.FunctionType, str | int, Any]


def _tensor_places(model: nn.Module) -> list[Place]:
    """Where the model's code finds tensors besides its parameters and buffers, as ``(name, namespace, key,
    value)`` with ``namespace[key] is value``: module attributes (a tensor, or a list, tuple or dict of them), the
    attributes of plain objects a module holds, Python-defined classes' attributes, and the module-level tensors
    their code reads (:func:`_global_tensors`: ``SCALE.mul_(2)`` in forward or a helper it calls). A forward writing
    into one changes the caller's state."""
    places, seen = [], set()
    for name, (module, attr, value) in _attributes(model).items():
        if _copyable(value):
            places.append((name, module.__dict__, attr, value))
        elif not isinstance(value, nn.Module) and hasattr(value, "__dict__") and not is_library(type(value).__module__):
            if id(value) not in seen:
                seen.add(id(value))
                found = [(f"{name}.{a}", vars(value), a, t) for a, t in vars(value).items()]
                places += [place for place in found if isinstance(place[3], torch.Tensor)]
    return places + _class_tensors(model) + _global_tensors(model)


def _class_tensors(model: nn.Module) -> list[tuple[str, type, str, Any]]:
    """The tensors on the model's Python-defined classes, as places."""
    return [
        (_name(prefix, f"{cls.__name__}.{attr}"), cls, attr, value)
        for prefix, cls in _python_classes(model)
        for attr, value in vars(cls).items()
        if isinstance(value, torch.Tensor)
    ]


def _global_tensors(model: nn.Module) -> list[Place]:
    """The module-level tensors the model's Python code reads, as places: the globals its classes' methods read,
    and those of the user's functions they call (:data:`_CALL_DEPTH` calls deep), attributes of the user's own
    modules they read (``helpers.TABLE``), and tensors given as those functions' default arguments."""
    places: list[Place] = []
    seen: set[tuple[int, str | int]] = set()  # places, by namespace and key
    visited: set[int] = set()  # functions

    def add(where: str, namespace: Any, key: str | int, tensor: torch.Tensor) -> None:
        if (id(namespace), key) not in seen:
            seen.add((id(namespace), key))
            places.append((where, namespace, key, tensor))

    def visit(function: types.FunctionType, reader: str, depth: int) -> None:
        if depth > _CALL_DEPTH or id(function) in visited or installed_code(function.__code__.co_filename):
            return
        visited.add(id(function))
        for i, default in enumerate(function.__defaults__ or ()):
            if isinstance(default, torch.Tensor):
                add(f"a default argument of {function.__qualname__}", function, i, default)
        for key, default in (function.__kwdefaults__ or {}).items():
            if isinstance(default, torch.Tensor):
                add(f"the default {key} of {function.__qualname__}", function.__kwdefaults__, key, default)
        namespace, attributes = function.__globals__, names_read(function.__code__)
        for global_name in sorted(globals_loaded(function.__code__)):
            value = namespace.get(global_name)
            if isinstance(value, torch.Tensor):
                add(f"the global {global_name} (read by {reader})", namespace, global_name, value)
            elif isinstance(value, types.FunctionType):
                visit(value, value.__qualname__, depth + 1)
            elif isinstance(value, types.ModuleType) and not is_library(value.__name__):
                for attr in sorted(attributes & vars(value).keys()):
                    item = vars(value)[attr]
                    if isinstance(item, torch.Tensor):
                        add(f"{global_name}.{attr} (read by {reader})", vars(value), attr, item)
                    elif isinstance(item, types.FunctionType):
                        visit(item, item.__qualname__, depth + 1)

    for _, cls in _python_classes(model):
        for value in vars(cls).values():
            function = getattr(value, "__func__", value)
            if isinstance(function, types.FunctionType):
                visit(function, cls.__name__, 0)
    for name, hook in _forward_hooks(model):  # hooks run in the forward too: the globals and defaults they read
        function = getattr(hook, "__func__", hook)
        function = function.func if isinstance(function, functools.partial) else function
        if isinstance(function, types.FunctionType):
            visit(function, f"the hook {name}", 0)
    return places


def _put(namespace: Any, key: str | int, value: Any) -> None:
    if isinstance(namespace, types.FunctionType):  # a default argument: the defaults are a tuple
        defaults = list(namespace.__defaults__)
        defaults[key] = value
        namespace.__defaults__ = tuple(defaults)
    elif isinstance(namespace, type):
        setattr(namespace, key, value)  # a class's __dict__ is a read-only mapping proxy
    else:
        namespace[key] = value


@contextlib.contextmanager
def tensor_attributes_copied(model: nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    """During the body, every tensor the model's code finds besides its parameters and buffers
    (:func:`_tensor_places`: module attributes, plain objects' attributes, class attributes, globals read) is a
    copy; yields the copies by name, to tell by their version counters and values whether the body wrote into them.
    The originals are put back after, so the caller's are never written to."""
    places = _tensor_places(model)
    copies: dict[str, torch.Tensor] = {}
    memo: dict[int, torch.Tensor] = {}
    for name, namespace, key, value in places:
        copy = _copied(value, memo)
        _put(namespace, key, copy)
        copies.update(_tensors_in(name, copy))
    # Tensors held deeper (a dict of lists, an object in an object, a closure cell) cannot be swapped for copies
    # in place: their values are saved and put back, and their version counters tell the probe of a write.
    copied = {id(t) for t in copies.values()}
    deeper = {name: t for name, t in _held_tensors(model) if id(t) not in copied and not isinstance(t, nn.Parameter)}
    saved = {name: (t, t._version, t.detach().clone()) for name, t in deeper.items()}
    copies.update(deeper)
    try:
        yield copies
    finally:
        for _, namespace, key, value in reversed(places):
            _put(namespace, key, value)
        with torch.no_grad():
            for t, version, value in saved.values():
                if t._version != version:
                    t.copy_(value)


def references_to_parameters(model: nn.Module) -> list[str]:
    """The held tensors (:func:`_held_tensors`) that are Parameters. Called inside the probe's forward (a forward
    pre-hook), whose parameters are swapped for plain tensors: a reference that follows the swap (an RNN's
    ``_flat_weights``) holds the stand-in then; a user's list (``self.ws = [self.lin.weight]``) still a Parameter
    (the original's copy, :func:`tensor_attributes_copied`)."""
    # a frozen Parameter (requires_grad=False) is a constant wherever it is read: no path of θ is missed
    return [name for name, t in _held_tensors(model) if isinstance(t, nn.Parameter) and t.requires_grad]


def _copy(t: torch.Tensor) -> torch.Tensor:
    """A copy of ``t``; of a Parameter, a Parameter (what :func:`references_to_parameters` looks for)."""
    copy = t.detach().clone()
    return nn.Parameter(copy, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else copy


def refuse_stale_tensors(model: nn.Module, recomputed: set[str], references: list[str]) -> None:
    """``ValueError`` naming held tensors (:func:`_held_tensors`) or buffers that carry a graph back to the
    parameters (``grad_fn``), and ``references`` to the parameters (:func:`references_to_parameters`), where the
    forward does not recompute them (``recomputed``: what it assigned, from :class:`Changes`): the NTK would miss
    their path."""
    derived = [name for name, t in _held_tensors(model) if t.grad_fn is not None]
    stale = [name for name in derived + references if name.split("[")[0] not in recomputed]
    stale += [name for name, b in model.named_buffers() if b.grad_fn is not None]
    if stale:
        raise ValueError(
            f"the model holds tensors computed from its parameters, or references to them, outside its registered "
            f"parameters ({', '.join(stale[:3])}: a tied view such as self.dec_w = self.enc.weight[:], a list "
            "self.ws = [self.lin.weight], a cache filled before the call, a buffer registered from a parameter, or "
            "a hook, helper object or closure that reads a Parameter itself). "
            "torchntk swaps the parameters functionally and cannot follow such a tensor back to them, so the NTK "
            "would miss its path. Compute it inside forward (or use the one Parameter in both places)."
        )


def refuse_cached_parametrizations(model: nn.Module) -> None:
    """``ValueError`` inside ``torch.nn.utils.parametrize.cached()`` for a parametrized model: the cache holds the
    parametrized weights of the model's own parameters, which a functional swap does not reach (18% off)."""
    from torch.nn.utils import parametrize

    if getattr(parametrize, "_cache_enabled", 0) and any(parametrize.is_parametrized(m) for m in model.modules()):
        raise ValueError(
            "torchntk was called inside torch.nn.utils.parametrize.cached(): the parametrized weights are cached "
            "from the model's own parameters, which torchntk swaps, so the NTK would miss their path. Call it "
            "outside the cached() block."
        )


def refuse_gradient_hooks(model: nn.Module, selected: Iterable[str]) -> None:
    """``ValueError`` for selected parameters with a gradient hook (``p.register_hook``, a pruning mask): torch's
    backward applies it to the parameter's gradient, which a functional swap of the parameter does not reach, so
    every method's J would be the unhooked one (0.08-0.7 off)."""
    chosen = set(selected)
    hooked = [n for n, p in model.named_parameters() if n in chosen and getattr(p, "_backward_hooks", None)]
    if hooked:
        raise ValueError(
            f"the parameters {hooked[:3]}{' ...' if len(hooked) > 3 else ''} have gradient hooks (p.register_hook): "
            "torch's backward applies them to those parameters' gradients, which torchntk's functional J does not "
            "see. Remove the hooks; for a pruning mask use torch.nn.utils.prune (its mask is part of the forward), "
            "or leave those parameters out of params=."
        )


def refuse_wrappers(model: nn.Module) -> None:
    """``TypeError`` for a whole model wrapped where torchntk's functional swap of the parameters cannot reach
    (torch's own messages were "The stateless API can't be used with nn.DataParallel module" and "with Jitted
    modules"): naming the module to pass instead."""
    if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        raise TypeError(
            f"the model is wrapped in {type(model).__name__}, which torchntk cannot differentiate through; pass the "
            "wrapped module, model.module (its NTK is the same function's)."
        )
    if isinstance(model, torch.jit.ScriptModule):
        raise TypeError(
            f"the model is a TorchScript module ({type(model).__name__}: torch.jit.script or torch.jit.trace), "
            "whose parameters torchntk cannot swap functionally; pass the Python nn.Module it was made from "
            "(scripted submodules inside a Python model are fine)."
        )


def parameters_reached(out: Any, model: nn.Module) -> list[str]:
    """The model's Parameters that ``out``'s autograd graph reaches as leaves. A forward run with every parameter
    swapped for a copy that does not require grad reaches none of them, unless it reads a Parameter past the swap:
    through a hook, a helper object, a closure, a partial, a ParameterList held elsewhere (0.12 off, every method)."""
    names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    pending = [t.grad_fn for t in _leaves(out) if isinstance(t, torch.Tensor) and t.grad_fn is not None]
    pending += [t for t in _leaves(out) if isinstance(t, torch.Tensor) and id(t) in names]  # returned as it is
    found, seen = [], set()
    while pending:
        node = pending.pop()
        if isinstance(node, torch.Tensor):
            found.append(names[id(node)])
            continue
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        variable = getattr(node, "variable", None)  # an AccumulateGrad node: its leaf
        if variable is not None and id(variable) in names:
            found.append(names[id(variable)])
        pending.extend(next_node for next_node, _ in node.next_functions)
    return sorted(set(found))


def _leaves(value: Any) -> list[Any]:
    from torch.utils._pytree import tree_leaves

    return tree_leaves(value)
