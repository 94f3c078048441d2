"""One architecture fingerprint: what a module's forward computes, apart from its parameter and buffer values.

Used by the conversion cache (a converted function is reused only for the same fingerprint) and by the kernel
store (a journal of finished tiles is trusted only for the same fingerprint), so that both agree on what "the same
model" means. It covers, for every module of the tree:

- its class and the *bytecode* of every method of every non-torch class in its MRO (a monkeypatched method, a class
  redefined in a notebook, a changed helper method: all change it; comments and line numbers do not);
- its instance attributes: plain values (strides, eps, flags), plain tensors (values), functions
  (``self.act = torch.relu`` vs ``torch.tanh``: torch/stdlib functions by name, others by bytecode, closure cell
  values, defaults and the globals they read), ``functools.partial``, classes, dtypes, containers of these, the
  ``training`` flag and forward hooks;
- the module-level constants its code reads (``co_names`` looked up in the function's globals: numbers, strings,
  tensors, functions), the attributes it reads of helper modules (``helpers.SCALE``, ``helpers.act``) and the
  global forward hooks;
- modules kept outside the tree (in a list or dict attribute, behind a bound method): their whole subtree and
  their parameter and buffer values, which are constants of the function; the objects behind bound methods and
  objects of classes defined in Python (config objects: class and attributes, slots included); methods patched
  into library classes (``nn.GELU.forward = mine``) and functions patched into library modules;
- parameter and buffer names, shapes and dtypes (values are hashed separately: :func:`tensor_digest`).

What cannot be hashed (an attribute holding an object of a C type with state Python cannot see) is listed in
:attr:`Fingerprint.uncertain`: such a fingerprint may match a different model, and nothing keyed by it may be
reused (a check on one example or one tile did not tell models apart that differ elsewhere).
"""

from __future__ import annotations

import dataclasses
import dis
import enum
import functools
import hashlib
import json
import os
import sys
import sysconfig
import types
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

# Modules whose functions and classes are identified by name (their code is fixed by the installed version).
_LIBRARIES = frozenset({"torch", "numpy", "jax", "einops", "torchvision", "timm", "transformers"}) | frozenset(
    sys.stdlib_module_names
)
_STDLIB = os.path.abspath(sysconfig.get_paths()["stdlib"]) + os.sep
# Instance attributes that never change what forward computes (or are hashed elsewhere).
_SKIPPED_ATTRIBUTES = frozenset(
    {"_parameters", "_buffers", "_modules", "_non_persistent_buffers_set", "_is_full_backward_hook"}
)
_SKIPPED_CLASS_ATTRIBUTES = frozenset(
    {"__dict__", "__weakref__", "__doc__", "__module__", "__qualname__", "__annotations__", "__firstlineno__"}
    | {"__static_attributes__", "__orig_bases__", "__parameters__", "__slots__", "__abstractmethods__", "_abc_impl"}
)
# Names whose reading makes a function depend on the process, not on the model: environment variables.
_PROCESS_STATE = frozenset({"environ", "getenv", "getenvb"})
_MAX_DEPTH = 6  # nesting of functions, closures and containers followed before giving up (marked uncertain)
_LIBRARY_LEVELS = 2  # library functions followed below a library method, looking for a user's function patched in


@dataclass(frozen=True)
class Fingerprint:
    """``digest``: hex SHA-256; ``uncertain``: where it could not see (empty when it covers everything)."""

    digest: str
    uncertain: tuple[str, ...] = ()

    @property
    def certain(self) -> bool:
        return not self.uncertain


def tensor_digest(tensor: Tensor) -> str:
    """Hex SHA-256 of a tensor's shape, dtype and values (bit for bit, NaN payloads included)."""
    if hasattr(tensor, "digest_into"):  # inputs read from a dataset (torchntk._data.DatasetColumn): streamed once
        digest = hashlib.sha256(b"dataset|")
        tensor.digest_into(digest)
        return digest.hexdigest()
    data = tensor.detach().cpu().contiguous().reshape(-1)
    digest = hashlib.sha256(f"{tuple(tensor.shape)}|{tensor.dtype}|".encode())
    if data.numel():
        digest.update(data.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def values_digest(named: Iterable[tuple[str, Tensor]]) -> str:
    """Hex SHA-256 of named tensors (names, shapes, dtypes and values), in the order given."""
    digest = hashlib.sha256()
    for name, tensor in named:
        digest.update(f"{name}={tensor_digest(tensor)};".encode())
    return digest.hexdigest()


_CODE = (types.FunctionType, staticmethod, classmethod, property)


def is_dunder(name: str) -> bool:
    return name.startswith("__") and name.endswith("__")


def is_library(module_name: str | None) -> bool:
    """Whether a module's code is fixed by the installed version (torch, numpy, ..., the standard library): described
    by name. A user's package named like a standard module (``code/``, ``trace/``) is not: its bytecode is hashed
    (a store served the tiles of its earlier version, 0.46 off)."""
    top = (module_name or "").split(".")[0]
    if top not in _LIBRARIES:
        return False
    if top not in sys.stdlib_module_names:
        return True
    file = getattr(sys.modules.get(top), "__file__", None)
    return file is None or os.path.abspath(file).startswith(_STDLIB)


_INSTALLED = tuple(
    {os.path.abspath(sysconfig.get_paths()[key]) + os.sep for key in ("stdlib", "platstdlib", "purelib", "platlib")}
)


def installed_code(filename: str) -> bool:
    """Whether code of ``filename`` was installed (the standard library, site-packages, a frozen module), not the
    user's: a function claiming a library's ``__module__`` (``functools.wraps`` copies it) is judged by its code."""
    return filename.startswith("<") or os.path.abspath(filename).startswith(_INSTALLED)


def users_object(value: Any, depth: int = 0) -> bool:
    """Whether ``value``, found in a library's namespace (``F.linear``, ``torch.Tensor.tanh``), is the user's: a
    function whose code is not in its library's files (``functools.wraps`` copies torch's ``__module__``), a
    ``functools.partial`` of one or with one as an argument, a bound method of a user's object (``MyFn.apply``), or
    an instance of a user's class. Each let a store serve the unpatched model's tiles (0.78-0.89 off)."""
    if depth > 3:
        return False
    if isinstance(value, types.FunctionType):
        return not (is_library(value.__module__) and installed_code(value.__code__.co_filename))
    if isinstance(value, functools.partial):
        parts = [value.func, *value.args, *(value.keywords or {}).values()]
        return any(users_object(part, depth + 1) for part in parts)
    if isinstance(value, types.MethodType):
        return users_object(value.__func__, depth + 1) or users_object(value.__self__, depth + 1)
    if isinstance(value, type):
        return not is_library(value.__module__)
    if isinstance(value, types.BuiltinFunctionType):  # a C method bound to a user's class (``MyFunction.apply``)
        owner = value.__self__
        return owner is not None and not isinstance(owner, types.ModuleType) and users_object(owner, depth + 1)
    if isinstance(value, (types.ModuleType, Tensor)) or value is None:
        return False
    if callable(value) and not isinstance(value, (staticmethod, classmethod)):
        return not is_library(type(value).__module__)
    return False


def _code_digest(code: types.CodeType) -> str:
    """Bytecode, constants (nested code objects recursively) and names: what the code does, not where it sits."""
    consts = [_code_digest(c) if isinstance(c, types.CodeType) else repr(c) for c in code.co_consts]
    text = repr((code.co_code, consts, code.co_names, code.co_varnames, code.co_argcount, code.co_flags))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


@functools.lru_cache(maxsize=4096)  # code objects are immutable; dis is slower than co_names
def globals_loaded(code: types.CodeType) -> frozenset[str]:
    """The global names a code object (and the code nested in it) loads: not its attribute names (``self.data``
    is no read of a global ``data``: looked up, it pulled a 320 MB global into every fingerprint)."""
    names = {i.argval for i in dis.get_instructions(code) if i.opname in ("LOAD_GLOBAL", "LOAD_NAME")}
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= globals_loaded(const)
    return frozenset(names)


def names_read(code: types.CodeType) -> set[str]:
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= names_read(const)
    return names


class _Describer:
    """Turns objects into JSON-able descriptions; collects what it cannot describe in ``uncertain``."""

    def __init__(self, skip: frozenset[str] = frozenset(), tree: dict[int, str] | None = None) -> None:
        self.skip = _SKIPPED_ATTRIBUTES | skip  # instance attributes left out
        self.uncertain: list[str] = []
        self.tree = tree or {}  # id -> name of the modules described as the model's tree
        self._classes: dict[type, Any] = {}
        self._library_bases: dict[type, Any] = {}
        self._active: set[int] = set()  # objects being described: a reference back to one is a cycle
        self._modules_active: set[int] = set()  # Python modules being described (module_object)

    def value(self, value: Any, where: str, depth: int = 0) -> Any:
        if isinstance(value, (type(None), bool, int, float, complex, str, bytes)):
            return repr(value)
        if isinstance(value, enum.Enum):
            return f"{type(value).__qualname__}.{value.name}"
        if isinstance(value, (torch.dtype, torch.device, torch.layout, torch.memory_format, torch.Size)):
            return str(value)
        if isinstance(value, Tensor):
            return ["tensor", tensor_digest(value)]
        if isinstance(value, (np.ndarray, np.generic)):
            return ["ndarray", tensor_digest(torch.from_numpy(np.ascontiguousarray(value)))]
        if depth > _MAX_DEPTH:
            self.uncertain.append(f"{where}: nested too deeply")
            return "?"
        if id(value) in self._active:
            return ["cycle", type(value).__qualname__]
        self._active.add(id(value))
        try:
            return self._composite(value, where, depth + 1)
        finally:
            self._active.discard(id(value))

    def _composite(self, value: Any, where: str, depth: int) -> Any:
        if isinstance(value, (tuple, list)):
            return [type(value).__qualname__, [self.value(v, f"{where}[{i}]", depth) for i, v in enumerate(value)]]
        if isinstance(value, dict):
            items = sorted(value.items(), key=lambda kv: repr(kv[0]))
            return ["dict", [[repr(k), self.value(v, f"{where}[{k!r}]", depth)] for k, v in items]]
        if isinstance(value, (set, frozenset)):
            return ["set", sorted(repr(self.value(v, where, depth)) for v in value)]
        if isinstance(value, types.FunctionType):
            return self.function(value, where, depth)
        if isinstance(value, types.MethodType):  # and the object it is bound to: its state is the method's too
            owner = self.value(value.__self__, f"{where}.__self__", depth)
            return ["method", owner, self.value(value.__func__, where, depth)]
        if isinstance(value, functools.partial):
            return ["partial", *(self.value(v, where, depth) for v in (value.func, value.args, value.keywords))]
        if isinstance(value, (staticmethod, classmethod)):
            return [type(value).__name__, self.value(value.__func__, where, depth)]
        if isinstance(value, property):
            return ["property", *(self.value(f, where, depth) for f in (value.fget, value.fset))]
        if isinstance(value, type):
            return self.cls(value, depth)
        if isinstance(value, nn.Module):
            if id(value) in self.tree:  # described in the tree, parameter and buffer values apart
                return ["tree-module", self.tree[id(value)]]
            # kept outside the tree (a list or dict attribute, a bound method's owner): its weights are not the
            # model's parameters but constants of its function, so their values count, and so does its subtree
            return ["module", self.outside_module(value, where, depth)]
        if isinstance(value, types.ModuleType):  # held by the model (self.cfg = helpers): all it holds may be read
            names = {name for name in vars(value) if not is_dunder(name)}
            return self.module_object(value, names, where, depth)
        if dataclasses.is_dataclass(value) or isinstance(value, types.SimpleNamespace) or _plain_object(value):
            # a config object of the user's own class: its class's code and its attributes
            return ["object", self.cls(type(value), depth), self.value(_object_state(value), where, depth)]
        owner = getattr(value, "__self__", None)
        if isinstance(value, types.BuiltinMethodType) and not isinstance(owner, (type, types.ModuleType, type(None))):
            return ["bound-builtin", value.__name__, self.value(owner, where, depth)]  # some_tensor.add
        if callable(value) and is_library(getattr(value, "__module__", None) or type(value).__module__):
            # builtins (torch.relu), ufuncs, torch.ops overloads: identified by name
            name = getattr(value, "__qualname__", None) or getattr(value, "__name__", None) or str(value)
            return ["library", getattr(value, "__module__", None) or type(value).__module__, name]
        self.uncertain.append(f"{where}: a {type(value).__module__}.{type(value).__qualname__}")
        return ["opaque", type(value).__module__, type(value).__qualname__]

    def function(self, fn: types.FunctionType, where: str, depth: int) -> Any:
        name = f"{fn.__module__}.{fn.__qualname__}"
        if is_library(fn.__module__):
            return ["function", name]
        code = fn.__code__
        if process_state := sorted(names_read(code) & _PROCESS_STATE):
            self.uncertain.append(f"{where} via {name}: reads the process's state ({', '.join(process_state)})")
        cells = []
        for cell in fn.__closure__ or ():
            try:
                contents = cell.cell_contents
            except ValueError:  # an empty cell
                cells.append("<empty>")
                continue
            if isinstance(contents, types.ModuleType):
                # imported inside the enclosing function (``import torch`` in a model factory): like a global
                # module, the attributes the code reads. Every attribute instead walked all of torch (2.2 M objects,
                # 0.9 s) into typing_extensions and came back uncertain: the model was converted on every call.
                cells.append(self.module_object(contents, names_read(code), f"{where} closure of {name}", depth))
            else:
                cells.append(self.value(contents, f"{where} closure of {name}", depth))
        return [
            "function",
            name,
            _code_digest(code),
            cells,
            self.value((fn.__defaults__, fn.__kwdefaults__), f"{where} defaults of {name}", depth),
            self.globals_read(code, fn.__globals__, f"{where} via {name}", depth),
        ]

    def globals_read(self, code: types.CodeType, namespace: dict[str, Any], where: str, depth: int) -> Any:
        """The module-level values a function's code reads: constants by value, functions by identity."""
        seen = []
        for name in sorted(globals_loaded(code)):
            if name not in namespace:
                continue  # an attribute name (self.act), a builtin, or a global not defined (yet)
            value = namespace[name]
            if isinstance(value, types.ModuleType):  # helpers.SCALE, helpers.act: the attributes the code reads
                seen.append([name, self.module_object(value, names_read(code), f"{where} via {name}", depth)])
                continue
            seen.append([name, self.value(value, f"global {name} ({where})", depth)])
        return seen

    def module_object(self, module: types.ModuleType, names: set[str], where: str, depth: int) -> Any:
        """A Python module the code reads attributes of (``helpers.SCALE``, ``helpers.act``): those of ``names`` it
        has, by value. A library's (torch, F, np) are versioned code: only a function of the user's patched into
        one (``F.gelu = mine``) is described."""
        if is_library(module.__name__):
            # the user's objects patched into it (``F.gelu = mine``), also down a dotted path
            # (``torch.nn.functional.gelu``: its submodules the code names)
            if id(module) in self._modules_active or depth > _MAX_DEPTH:
                return ["module-object", module.__name__, []]
            self._modules_active.add(id(module))
            try:
                patched = []
                for name in sorted(names):
                    value = vars(module).get(name)
                    if isinstance(value, types.ModuleType) and is_library(value.__name__):
                        inner = self.module_object(value, names, f"{where}.{name}", depth + 1)
                        if inner[2]:
                            patched.append([name, inner])
                    elif users_object(value):
                        patched.append([name, self.value(value, f"{where}.{name}", depth + 1)])
            finally:
                self._modules_active.discard(id(module))
            return ["module-object", module.__name__, patched]
        if depth > _MAX_DEPTH:
            self.uncertain.append(f"{where}: nested too deeply")
            return "?"
        if id(module) in self._modules_active:
            return ["cycle", module.__name__]
        self._modules_active.add(id(module))
        try:
            read = []
            for name in sorted(names & vars(module).keys()):
                value = vars(module)[name]
                if isinstance(value, types.ModuleType):
                    read.append([name, self.module_object(value, names, f"{where}.{name}", depth + 1)])
                else:
                    read.append([name, self.value(value, f"{where}.{name}", depth + 1)])
            return ["module-object", module.__name__, read]
        finally:
            self._modules_active.discard(id(module))

    def cls(self, cls: type, depth: int) -> Any:
        """A class by name, plus the bytecode of its own methods and class-level values for non-library classes."""
        if cls in self._classes:
            return self._classes[cls]
        self._classes[cls] = ["class", f"{cls.__module__}.{cls.__qualname__}"]  # while being described: cycles
        description: list[Any] = ["class", f"{cls.__module__}.{cls.__qualname__}"]
        for base in cls.__mro__:
            if base is object:
                continue
            if is_library(base.__module__):  # versioned code, unless the user patched a method into it
                description.append(self.patched(base, depth))
                continue
            for attribute, value in sorted(vars(base).items()):
                if attribute in _SKIPPED_CLASS_ATTRIBUTES or (is_dunder(attribute) and not isinstance(value, _CODE)):
                    continue  # bookkeeping that Python adds lazily (copy adds __slotnames__): not behaviour
                if isinstance(value, (types.MemberDescriptorType, types.GetSetDescriptorType)):
                    continue  # a slot's accessor: the slot's value is described with the object
                description.append([base.__qualname__, attribute, self.value(value, f"{cls.__qualname__}", depth)])
        self._classes[cls] = description
        return description

    def patched(self, base: type, depth: int) -> Any:
        """The methods of a library class that come from outside the libraries (``nn.GELU.forward = mine``), and the
        functions of the user's that its own methods reach through library modules (``F.leaky_relu = mine``, read by
        ``nn.LeakyReLU.forward``: a store served the unpatched model's tiles, 0.25 off, where the patch changed
        only the derivative)."""
        if base not in self._library_bases:
            self._library_bases[base] = []  # while being described: cycles
            found = []
            for attribute, value in sorted(vars(base).items()):
                if not isinstance(value, _CODE):
                    continue
                where = f"{base.__qualname__}.{attribute}"
                function = _function_of(value)
                if users_object(function) or not is_library(getattr(function, "__module__", None)):
                    found.append([attribute, self.value(value, where, depth)])
                elif reached := self.patched_reads(function, where, depth, set()):
                    found.append([attribute, "reaches", reached])
            self._library_bases[base] = found
        return self._library_bases[base]

    def patched_reads(self, function: Any, where: str, depth: int, seen: set[int], level: int = 0) -> list[Any]:
        """User functions that a library function's code reads from the libraries' modules (``F.x``, ``torch.x``,
        or a global of its own module), following library Python functions up to :data:`_LIBRARY_LEVELS` deep (a
        module's forward calls ``F.multi_head_attention_forward``, which calls ``F.linear``); empty when none."""
        code, namespace = getattr(function, "__code__", None), getattr(function, "__globals__", None)
        if code is None or namespace is None or id(code) in seen or level > _LIBRARY_LEVELS:
            return []
        seen.add(id(code))
        reached: list[Any] = []
        candidates = []
        for name in sorted(globals_loaded(code)):
            value = namespace.get(name)
            if isinstance(value, types.ModuleType) and is_library(value.__name__):
                candidates += [(f"{name}.{a}", vars(value).get(a)) for a in sorted(names_read(code))]
            else:
                candidates.append((name, value))
        for name, value in candidates:
            if users_object(value):
                reached.append([name, self.value(value, f"{where} via {name}", depth + 1)])
            elif isinstance(value, types.FunctionType):
                if deeper := self.patched_reads(value, f"{where} via {name}", depth, seen, level + 1):
                    reached.append([name, deeper])
        return reached

    def outside_module(self, module: nn.Module, where: str, depth: int) -> list[Any]:
        """A module outside the model's tree: its whole subtree, parameter and buffer values included."""
        subtree = [[name, self.module(m, f"{where}.{name}", depth)] for name, m in module.named_modules()]
        state = [*module.named_parameters(), *module.named_buffers()]
        return [subtree, values_digest(state)]

    def module(self, module: nn.Module, where: str, depth: int) -> list[Any]:
        """One module (not its children): class, attributes, hooks, parameter and buffer signatures."""
        attributes = []
        for attribute, value in sorted(vars(module).items()):
            if attribute in self.skip:
                continue
            if "hook" in attribute and isinstance(value, dict):  # keyed by handle ids, which change on re-register
                value = list(value.values())
            attributes.append([attribute, self.value(value, f"{where or 'model'}.{attribute}", depth)])
        signatures = [
            [kind, name, list(t.shape), str(t.dtype)]
            for kind, items in (("param", module._parameters), ("buffer", module._buffers))
            for name, t in items.items()
            if t is not None
        ]
        return [self.cls(type(module), depth), attributes, signatures]


def _function_of(value: Any) -> Any:
    """The function behind a method-like class attribute (a property's getter)."""
    if isinstance(value, property):
        return value.fget
    return getattr(value, "__func__", value)


# A class defined by a Python class statement is a heap type and mutable; C types are static, or heap types
# marked immutable (array.array, locks, compiled patterns since Python 3.10).
_HEAP_TYPE, _IMMUTABLE_TYPE = 1 << 9, 1 << 8


def _plain_object(value: Any) -> bool:
    """An instance of classes all defined in Python (no C base but ``object``), the user's or a library's (a
    ``transformers`` config): its whole state is its ``__dict__`` and slots, described by class and attributes. An
    object of a C type (a random generator, a lock, an ``array``) keeps state Python cannot see: it stays opaque."""
    bases = type(value).__mro__[:-1]
    return bool(bases) and all(b.__flags__ & _HEAP_TYPE and not b.__flags__ & _IMMUTABLE_TYPE for b in bases)


def _object_state(value: Any) -> dict[str, Any]:
    state = dict(getattr(value, "__dict__", {}))
    for base in type(value).__mro__:
        for slot in vars(base).get("__slots__", ()):
            if slot not in ("__dict__", "__weakref__") and hasattr(value, slot):
                state[slot] = getattr(value, slot)
    return state


def architecture(model: nn.Module, *, modes: bool = True) -> Fingerprint:
    """The fingerprint of what ``model``'s forward computes, its parameter and buffer values aside.

    Two models with equal digests run the same code on the same hyperparameters; parameter tying (one tensor
    under several names) is part of it. ``modes=False`` leaves out the modules' ``training`` flags (for a
    conversion, which always runs the model in eval mode). Cost: tens of microseconds per module.
    """
    modules = list(model.named_modules(remove_duplicate=False))
    names = {id(module): name for name, module in reversed(modules)}  # a module registered twice: its first name
    describe = _Describer(skip=frozenset() if modes else frozenset({"training"}), tree=names)
    tree = [[name, describe.module(module, name, 0)] for name, module in modules]
    tying = [name for name, _ in model.named_parameters(remove_duplicate=True)]
    hooks = nn.modules.module
    global_hooks = [
        describe.value(list(getattr(hooks, name, {}).values()), name, 0)
        for name in ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_module_registration_hooks")
    ]
    # methods the user patched into torch.Tensor (``torch.Tensor.tanh = mine``, called as ``x.tanh()``): only when
    # there are some, so that every other fingerprint stays as it was
    tensor_methods = [
        [name, describe.value(value, f"torch.Tensor.{name}", 0)]
        for name, value in sorted(vars(Tensor).items())
        if isinstance(value, types.FunctionType | functools.partial) and users_object(value)
    ]
    text = json.dumps([tree, tying, global_hooks, *([tensor_methods] if tensor_methods else [])], default=str)
    return Fingerprint(hashlib.sha256(text.encode()).hexdigest(), tuple(dict.fromkeys(describe.uncertain)))
