"""What a module's code may do, read statically before anything is traced: the names and strings its methods
(and the functions they reach) read. Conservative: a method that never runs counts."""

from __future__ import annotations

import functools
import types
from typing import Any

from torch import nn

from torchntk._fingerprint import globals_loaded, is_library, names_read


def code_names(module: nn.Module, *, libraries: bool = True) -> set[str]:
    """The names and string constants of the code ``module`` may run: every method of its class (``nn.Module``'s
    own apart), the functions the instance holds (``self.post = some_function``), and the functions those reach
    through globals or a helper module; ``libraries=False`` leaves out torch's (and other libraries') classes and
    functions. A static look, run before anything is traced; conservative (a method that never runs counts)."""
    found: set[str] = set()
    seen: set[int] = set()
    bases = [
        b for b in type(module).__mro__ if b not in (nn.Module, object) and (libraries or not is_library(b.__module__))
    ]
    # The definitions that can run in a forward: a subclass's override hides its base's (unless it calls super()),
    # and __init__ runs before (it often sets weights under torch.no_grad).
    effective: dict[str, Any] = {}
    for base in bases:
        for attribute, value in vars(base).items():
            if attribute != "__init__":
                effective.setdefault(attribute, value)
    pending = list(effective.values())
    if any("super" in names_read(f.__code__) for f in pending if isinstance(f, types.FunctionType)):
        pending = [v for base in bases for a, v in vars(base).items() if a != "__init__"]
    pending += list(vars(module).values())
    while pending:
        value = pending.pop()
        value = value.fget if isinstance(value, property) else getattr(value, "__func__", value)
        value = value.func if isinstance(value, functools.partial) else value
        if not isinstance(value, types.FunctionType) or id(value) in seen:
            continue
        if not libraries and is_library(value.__module__):
            continue
        seen.add(id(value))
        found |= names_read(value.__code__) | _strings(value.__code__)  # getattr(self, "training") too
        for name in globals_loaded(value.__code__) & value.__globals__.keys():  # helpers, or a module object's
            reached = value.__globals__[name]
            if isinstance(reached, types.ModuleType):
                pending.extend(vars(reached).get(n) for n in names_read(value.__code__))
            else:
                pending.append(reached)
    return found


def reads_training_flag(module: nn.Module) -> bool:
    """Whether ``module``'s code may read a ``training`` flag (:func:`code_names`)."""
    return "training" in code_names(module)


# Code that changes torch's grad mode or hooks the backward pass: forward-mode derivatives (NTK-vector products'
# JVPs) do not see either, and gave kernels 0.15-1.1 off.
_GRAD_MODE_NAMES = frozenset({"no_grad", "set_grad_enabled", "inference_mode", "enable_grad", "register_hook"})


def backward_only_code(model: nn.Module) -> list[str]:
    """Modules whose own code may switch grad mode or hook the backward pass (:data:`_GRAD_MODE_NAMES`; torch's
    layers do neither in their forward, and their initialisers' ``no_grad`` would flag every layer)."""
    return [
        name or type(model).__name__
        for name, m in model.named_modules()
        if code_names(m, libraries=False) & _GRAD_MODE_NAMES
    ]


def _strings(code: types.CodeType) -> set[str]:
    found = {c for c in code.co_consts if isinstance(c, str)}
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            found |= _strings(const)
    return found


def modes_a_conversion_misses(model: nn.Module) -> list[str]:
    """Modules whose code reads a ``training`` flag (:func:`reads_training_flag`), when any module is in training
    mode: a conversion, which takes the eval-mode function, may compute another function than torch runs (a parent
    in eval mode reading its child's flag counts: the flag read need not be the reader's own)."""
    named = list(model.named_modules())
    if not any(m.training for _, m in named):
        return []
    return [name or type(model).__name__ for name, m in named if reads_training_flag(m)]
