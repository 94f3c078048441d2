"""Validated inputs of one NTK computation, shared by every implementation.

:func:`prepare` checks what the user passed (model mode, input shapes and dtypes, parameter selection, axes) and
raises an error that names the problem and the fix; the implementations then trust an :class:`NTKProblem`.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils.stateless import _reparametrize_module  # functional_call's swap, as a context

from torchntk._axes import canonicalize_axes, kernel_shape
from torchntk._backward_conventions import BackwardConventions
from torchntk._caller_state import refuse_inference_weights
from torchntk._data import DatasetColumn, DatasetInputs, dataset_columns, is_dataset, place
from torchntk._module_state import (
    kept_as_it_was,
    parameters_reached,
    references_to_parameters,
    refuse_cached_parametrizations,
    refuse_gradient_hooks,
    refuse_stale_tensors,
    refuse_wrappers,
    tensor_attributes_copied,
)
from torchntk._precision import float32_throughout
from torchntk._probe import probe_output

Inputs = Tensor | Sequence[Tensor] | DatasetInputs | torch.utils.data.Dataset
ParamSelection = None | Sequence[str] | Callable[[str, nn.Parameter], bool] | Mapping[str, Tensor]

# Modules whose training-mode forward couples the examples of a batch (BatchNorm) or is random (Dropout): the
# NTK of such a forward is not a function of each example, so training mode is refused for them.
_TRAINING_SENSITIVE = (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd, nn.AlphaDropout)


@dataclass(frozen=True)
class NTKProblem:
    """What an implementation needs: the model, θ, both batches, and the kernel layout.

    ``x2`` is ``None`` when the kernel is of ``x1`` against itself. ``out_shape`` is one example's output shape;
    ``trace_axes``/``diagonal_axes`` are canonical axes of the batched output ``(N, *out_shape)``.
    """

    model: nn.Module
    params: dict[str, Tensor]
    x1: tuple[Tensor, ...]
    x2: tuple[Tensor, ...] | None
    out_shape: tuple[int, ...]
    out_dtype: torch.dtype
    trace_axes: tuple[int, ...]
    diagonal_axes: tuple[int, ...]
    aliases: dict[str, tuple[str, ...]]
    #: lookups with ``scale_grad_by_freq=True`` in the forward: the backward counts over the batch
    lookups_scaled_by_count: bool = False
    #: what makes forward mode differ from torch's backward on some inputs (:mod:`torchntk._backward_conventions`)
    forward_mode_differs: tuple[str, ...] = ()
    #: floating dtypes the forward computes in from θ (a float32 model's bfloat16 step rounds as bfloat16)
    computes_in: frozenset[torch.dtype] = frozenset()

    def forward(self, params: dict[str, Tensor], inputs: tuple[Tensor, ...]) -> Tensor:
        """The model's forward with θ replaced by ``params`` (buffers and unselected parameters its own)."""
        return functional_forward(self.model, self.aliases, params, inputs, others_detached=True)

    def swapped(self, params: dict[str, Tensor]) -> contextlib.AbstractContextManager[None]:
        """Within: θ replaced by ``params`` (:func:`parameters_swapped`), for a forward and its backward."""
        return parameters_swapped(self.model, self.aliases, params, others_detached=True)

    def pulled_back(
        self, inputs: tuple[Tensor, ...], cotangents: Callable[[Tensor], Iterable[Tensor]]
    ) -> tuple[Tensor, list[dict[str, Tensor]]]:
        """The outputs ``f(θ, inputs)`` and ``∂(u·f)/∂θ`` for each ``u`` of ``cotangents(outputs)`` (each of the
        outputs' shape, taken lazily), by plain ``torch.autograd.grad``: torch's own backward, no torch.func
        transform. The forward and every backward run within the swap (a reentrant checkpoint recomputes its
        forward during the backward); a parameter the outputs do not reach has a zero gradient."""
        params = {name: p.detach().requires_grad_() for name, p in self.params.items()}
        rows = []
        with torch.enable_grad(), self.swapped(params):
            out = self.model(*inputs)
            for u in cotangents(out.detach()):
                grads = (
                    torch.autograd.grad(out, list(params.values()), u.to(out), retain_graph=True, allow_unused=True)
                    if out.requires_grad
                    else (None,) * len(params)
                )
                rows.append(
                    {
                        name: torch.zeros_like(p) if g is None else g.to_dense()
                        for (name, p), g in zip(params.items(), grads, strict=True)
                    }
                )
        return out.detach(), rows

    @property
    def ndim(self) -> int:
        """Axes of the batched output, batch axis included."""
        return 1 + len(self.out_shape)

    @property
    def n1(self) -> int:
        return self.x1[0].shape[0]

    @property
    def n2(self) -> int:
        return self.n1 if self.x2 is None else self.x2[0].shape[0]

    @property
    def device(self) -> torch.device:
        return self.x1[0].device

    @property
    def shapes_differ(self) -> bool:
        """``x1``'s and ``x2``'s examples have other shapes (sequences of two lengths): they cannot share a batch."""
        return self.x2 is not None and any(a.shape[1:] != b.shape[1:] for a, b in zip(self.x1, self.x2, strict=True))

    @property
    def paired(self) -> bool:
        """Only ``Θ(x1[n], x2[n])`` is wanted (the batch axis is diagonal)."""
        return 0 in self.diagonal_axes

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.params.values())

    @property
    def out_size(self) -> int:
        return int(torch.Size(self.out_shape).numel())

    def kernel_shape(self) -> tuple[int, ...]:
        shape1, shape2 = (self.n1, *self.out_shape), (self.n2, *self.out_shape)
        return kernel_shape(shape1, shape2, self.trace_axes, self.diagonal_axes)


def outputs_in_chunks(problem: NTKProblem, size: int) -> Iterator[tuple[tuple[Tensor, ...], Tensor]]:
    """torch's outputs over every example of ``x1`` (then ``x2``), ``size`` examples at a time: ``(inputs,
    Tensor[n, *out])`` each, in float32 throughout and without a graph. What the model computes on the problem's
    data, for the checks that compare it (a cached conversion's outputs, a resumed store's projections)."""
    for batch in (problem.x1,) if problem.x2 is None else (problem.x1, problem.x2):
        for start in range(0, batch[0].shape[0], size):
            inputs = tuple(x[start : start + size] for x in batch)
            # grad mode, as the methods and the export run the forward (θ detached: no graph is recorded)
            with torch.enable_grad(), float32_throughout():
                yield inputs, problem.forward(problem.params, inputs).detach()


def canonical_names(model: nn.Module) -> dict[str, str]:
    """Every parameter name, aliases of tied parameters included, mapped to the name ``named_parameters()``
    reports (the first): a selection may name a tied parameter by any of its names."""
    first_name_of: dict[int, str] = {}
    for name, p in model.named_parameters():
        first_name_of.setdefault(id(p), name)
    return {name: first_name_of[id(p)] for name, p in model.named_parameters(remove_duplicate=False)}


def parameter_aliases(model: nn.Module) -> dict[str, tuple[str, ...]]:
    """Every name under which each parameter sits in a distinct module: ``{canonical name: (names...)}``.

    ``functional_call(..., tie_weights=True)`` corrupts a module registered under two names (it leaves a plain
    tensor behind on restore, torch 2.14), so torchntk swaps each (module, attribute) holding a parameter once itself.
    """
    canonical = {id(p): n for n, p in model.named_parameters()}
    aliases: dict[str, list[str]] = {}
    for prefix, module in model.named_modules():  # each module object once, whatever its aliases
        for attr, p in module._parameters.items():
            if p is not None:
                aliases.setdefault(canonical[id(p)], []).append(f"{prefix}.{attr}" if prefix else attr)
    return {n: tuple(names) for n, names in aliases.items()}


def hookable_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``model.named_modules()`` that take forward hooks: a scripted submodule (``torch.jit.script``) raises on
    ``register_forward_hook``, and so did every structured call on a model holding one."""
    return [(name, m) for name, m in model.named_modules() if not isinstance(m, torch.jit.ScriptModule)]


def float64_forward(
    model: nn.Module, aliases: dict[str, tuple[str, ...]], params: Mapping[str, Tensor]
) -> Callable[[tuple[Tensor, ...]], Tensor]:
    """``f(θ, x)`` in float64 for float32 rounding's referees (the probe's, the per-call check's): a float64 copy of
    ``model`` (made on the first call; the model is never modified) with ``params`` (θ's values, which may differ
    from the model's own) in float64, on float64 copies of the inputs."""
    copies: list[nn.Module] = []

    def forward(inputs: tuple[Tensor, ...]) -> Tensor:
        if not copies:
            copies.append(copy.deepcopy(model).double())
        doubled = {name: t.detach().double() for name, t in params.items()}
        inputs = tuple(x.double() if x.is_floating_point() else x for x in inputs)
        with torch.no_grad():
            return functional_forward(copies[0], aliases, doubled, inputs, others_detached=True)

    return forward


def functional_forward(
    model: nn.Module,
    aliases: dict[str, tuple[str, ...]],
    params: dict[str, Tensor],
    inputs: tuple[Tensor, ...],
    *,
    others_detached: bool = False,
    record: set[str] | None = None,
) -> Tensor:
    """``model(*inputs)`` with the parameters in ``params`` (canonical names) replaced, every alias included.

    Every forward starts from the module attributes as the caller left them and puts them back
    (:func:`torchntk._module_state.kept_as_it_was`: a cache a forward fills is recomputed from the swapped
    parameters on each); ``record`` collects the names of those it assigned."""
    with parameters_swapped(model, aliases, params, others_detached=others_detached, record=record):
        return model(*inputs)


@contextlib.contextmanager
def parameters_swapped(
    model: nn.Module,
    aliases: dict[str, tuple[str, ...]],
    params: dict[str, Tensor],
    *,
    others_detached: bool = False,
    record: set[str] | None = None,
) -> Iterator[None]:
    """Within: the model's parameters in ``params`` (canonical names) replaced, every alias included (what
    :func:`functional_forward` runs the forward in). A backward taken within reads them too: a reentrant
    checkpoint recomputes its forward during the backward, from the module's attributes."""
    full = {alias: value for name, value in params.items() for alias in aliases.get(name, (name,))}
    # ``others_detached``: parameters outside θ are constants, detached, so that grad mode (the torch-native methods
    # run in it) records no graph through them and no result requires grad; by the same names as θ's (one per
    # module object, as functional_call must see each module once). Not under torch.export: a detach is traced.
    for name, names in aliases.items() if others_detached else ():
        if name not in params and (p := model.get_parameter(name)).requires_grad:
            constant = p.detach()
            full.update((alias, constant) for alias in names)
    with kept_as_it_was(model) as changes:
        with _reparametrize_module(model, full, tie_weights=False, strict=False):
            yield
    if record is not None:
        record |= changes.changed


def as_inputs(x: Inputs, name: str) -> tuple[Tensor, ...]:
    """``x`` as a non-empty tuple of real floating tensors sharing a non-empty batch axis (or a dataset's columns)."""
    if is_dataset(x):
        return dataset_columns(x, name)
    if isinstance(x, tuple) and x and all(isinstance(t, DatasetColumn) for t in x):
        return x  # a dataset's columns, as prepared before (linalg passes them on to ntk and ntk_vp)
    if x is None:
        raise TypeError(f"{name} is None; pass a tensor of shape (N, ...) or a tuple of such tensors.")
    if isinstance(x, Mapping):
        raise TypeError(
            f"{name} is a {type(x).__name__}; pass a tensor of shape (N, ...), or a tuple of them in the order of the "
            "forward's arguments (a model taking keyword inputs: wrap it in a module whose forward takes them "
            "positionally)."
        )
    inputs = (x,) if isinstance(x, Tensor) else tuple(x)
    if not inputs:
        raise ValueError(f"{name} is an empty tuple; pass a tensor of shape (N, ...) or a tuple of such tensors.")
    for i, t in enumerate(inputs):
        where = name if len(inputs) == 1 else f"{name}[{i}]"
        if not isinstance(t, Tensor):
            raise TypeError(f"{where} is a {type(t).__name__}, not a torch.Tensor; convert it with torch.as_tensor.")
        if t.ndim == 0:
            raise ValueError(f"{where} is a scalar; inputs need a batch axis: pass shape (N, ...), e.g. x[None].")
        if t.is_meta:
            raise ValueError(
                f"{where} is on the meta device, which holds shapes but no values: a kernel needs values. Build the "
                "model and inputs on a real device (model.to_empty(device='cpu') and load its weights)."
            )
        if t.layout != torch.strided:
            raise TypeError(
                f"{where} is a {t.layout} tensor; torchntk takes dense inputs: pass {where}.to_dense() (a model of "
                "sparse inputs densifies them at its first layer anyway)."
            )
        if t.is_complex():
            raise TypeError(
                f"{where} is complex ({t.dtype}); the NTK here is of real functions of real inputs. Pass the real "
                f"and imaginary parts as a real tensor, e.g. torch.view_as_real({where}), and adapt the model."
            )
        if t.shape[0] == 0:
            raise ValueError(f"{where} has an empty batch (shape {tuple(t.shape)}); pass at least one example.")
        if t.shape[0] != inputs[0].shape[0]:
            raise ValueError(
                f"{name} holds tensors with different batch sizes {[tuple(u.shape) for u in inputs]}; "
                "every input of a multi-input model needs the same number of examples on axis 0."
            )
    # The NTK is by the parameters: inputs that require grad are constants here (and no graph may be built
    # through them: the torch-native methods run in grad mode, for torch.func's sake). A lazily negated view
    # (``z.conj().imag``) is resolved: numpy and torch.func refused its negative bit.
    # Inputs made under torch.inference_mode() cannot be saved for backward: copied (outside it, see _caller_state).
    return tuple((t.clone() if t.is_inference() else t).detach().resolve_neg() for t in inputs)


_INTEGER_DTYPE_WORDS = re.compile(r"\b(Long|Int|Short|Char|Byte|Bool|u?int(8|16|32|64)|bool)\b")


@contextlib.contextmanager
def integer_inputs_named(inputs: tuple[Tensor, ...], dtype: torch.dtype) -> Iterator[None]:
    """Name the integer inputs when a forward fails over an integer dtype (``mat1 and mat2 must have the same
    dtype, but got Long and Double``): integer inputs are for models that look them up (token ids, class labels) or
    cast them; float data passed as integers is the usual cause."""
    try:
        yield
    except (RuntimeError, TypeError) as error:
        integers = [f"input {i} ({t.dtype})" for i, t in enumerate(inputs) if not t.is_floating_point()]
        if not integers or not _INTEGER_DTYPE_WORDS.search(str(error)):
            raise
        raise TypeError(
            f"the model's forward failed on {', '.join(integers)} ({str(error).splitlines()[0][:200]}). Integer "
            "inputs are for models that look them up (nn.Embedding) or cast them; for a model of floating inputs "
            f"pass x.to({dtype})."
        ) from error


def check_same_examples(x1: tuple[Tensor, ...], x2: tuple[Tensor, ...], names: tuple[str, str] = ("x1", "x2")) -> None:
    """``x1`` and ``x2`` must hold examples of the same kind (count of input tensors, dtype, device; the per-example
    shapes may differ, e.g. sequences of two lengths, where the model gives both one output shape); ``names``: what
    the caller calls them."""
    n1, n2 = names
    if len(x1) != len(x2):
        raise ValueError(f"{n1} has {len(x1)} input tensors and {n2} has {len(x2)}; pass the same inputs for both.")
    for i, (a, b) in enumerate(zip(x1, x2, strict=True)):
        if a.ndim != b.ndim:
            raise ValueError(
                f"{n1} and {n2} examples differ in rank: input {i} has per-example shape {tuple(a.shape[1:])} in "
                f"{n1} and {tuple(b.shape[1:])} in {n2}; both batches hold examples of the same kind, (N, ...)."
            )
        if a.dtype != b.dtype or a.device != b.device:
            raise ValueError(
                f"input {i} is {a.dtype} on {a.device} in {n1} but {b.dtype} on {b.device} in {n2}; "
                "move both to the same dtype and device."
            )


def check_model_mode(model: nn.Module) -> None:
    """Refuse training mode where it makes examples interact (BatchNorm) or random (Dropout), and BatchNorm that
    normalizes by the batch in any mode."""
    offenders = [
        name or type(model).__name__
        for name, m in model.named_modules()
        if m.training and isinstance(m, _TRAINING_SENSITIVE)
    ]
    if offenders:
        raise ValueError(
            f"the model is in training mode and has BatchNorm/Dropout layers ({', '.join(offenders[:3])}"
            f"{', ...' if len(offenders) > 3 else ''}): in training mode they mix the examples of a batch or draw "
            "random masks, so the NTK is not defined per example. Call model.eval() first."
        )
    batch_statistics = [
        name or type(model).__name__
        for name, m in model.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is None
    ]
    if batch_statistics:
        raise ValueError(
            f"BatchNorm layers without running statistics ({', '.join(batch_statistics[:3])}: "
            "track_running_stats=False) normalize by the batch's statistics in eval mode too, so the examples of a "
            "batch are coupled and the NTK is not defined per example. Use running statistics (track_running_stats="
            "True, after some training steps), or a per-example normalization (GroupNorm, LayerNorm)."
        )


def _by_canonical_name(params: Mapping[str, Tensor], canonical: dict[str, str]) -> dict[str, Tensor]:
    """``params`` keyed by canonical names (a tied parameter under any of its names; buffers as given)."""
    keyed: dict[str, Tensor] = {}
    for name, value in params.items():
        key = canonical.get(name, name)
        if key in keyed:
            raise ValueError(
                f"params gives the tied parameter {key!r} twice (as {name!r} too): one value per parameter."
            )
        keyed[key] = value
    return keyed


def select_params(model: nn.Module, params: ParamSelection) -> dict[str, Tensor]:
    """θ as a dict ``name -> tensor`` (detached), from the selection rules of :func:`torchntk.ntk`."""
    named = dict(model.named_parameters())
    canonical = canonical_names(model)
    if params is None:
        chosen = {n: p for n, p in named.items() if p.requires_grad}
        what = "the model has no parameter with requires_grad=True"
    elif isinstance(params, Mapping):
        unknown = [n for n in params if n not in canonical and n not in dict(model.named_buffers())]
        if unknown:
            raise ValueError(f"params holds names {unknown} that the model does not have; known: {list(named)[:8]}")
        _refuse_buffers(model, params)
        params = _by_canonical_name(params, canonical)
        own = named  # buffers were refused above
        for n, t in params.items():
            if not isinstance(t, Tensor) or not t.is_floating_point():
                kind = t.dtype if isinstance(t, Tensor) else type(t).__name__
                raise TypeError(f"params[{n!r}] must be a real floating torch.Tensor, got {kind}.")
            if t.shape != own[n].shape:
                raise ValueError(f"params[{n!r}] has shape {tuple(t.shape)}, the model's has {tuple(own[n].shape)}.")
            if t.dtype != own[n].dtype or t.device != own[n].device:
                raise TypeError(
                    f"params[{n!r}] is {t.dtype} on {t.device} but the model's {n} is {own[n].dtype} on "
                    f"{own[n].device}: the values in params must match the model; pass "
                    f"params[{n!r}].to({own[n].dtype}, {str(own[n].device)!r}) (or move the model with .to())."
                )
        chosen = dict(params)
        what = "params is an empty dict"
    elif callable(params):
        # Asked of every name a parameter has (a tied weight's too), as a list may name it by any of them: the first
        # name alone left a tied decoder weight out of params=lambda n, p: n.startswith("decoder.") (0.72 off).
        picked = {canonical[n] for n, p in model.named_parameters(remove_duplicate=False) if params(n, p)}
        chosen = {n: p for n, p in named.items() if n in picked}
        what = "the params predicate selected no parameter"
    elif isinstance(params, str):
        raise TypeError(f"params={params!r} is a string; pass a list of names, e.g. params=[{params!r}].")
    else:
        unknown = [n for n in params if n not in canonical]
        if unknown:
            raise ValueError(f"params names {unknown} are not parameters of the model; known: {list(named)[:8]}")
        names = list(dict.fromkeys(canonical[n] for n in params))
        chosen = {n: named[n] for n in names}
        what = "params is an empty list"
    if not chosen:
        raise ValueError(f"no parameter selected: {what}. Select at least one parameter (params=None takes all).")
    complex_ = [n for n, t in chosen.items() if t.is_complex()]
    if complex_:
        raise TypeError(
            f"parameters {complex_[:3]} are complex; the NTK here is of real parameters. Select real ones (params=)."
        )
    integer = [f"{n} ({t.dtype})" for n, t in chosen.items() if not t.is_floating_point()]
    if integer:
        raise TypeError(
            f"parameters {integer[:3]} are not floating point: nothing can be differentiated with respect to them. "
            "Leave them out of params (a list of names, or a predicate such as lambda n, p: p.is_floating_point())."
        )
    # A parameter with no entries adds nothing to the kernel, and empty Jacobian blocks trip reshape(-1).
    nonempty = {n: t for n, t in chosen.items() if t.numel() > 0}
    if not nonempty:
        raise ValueError(f"the selected parameters {list(chosen)[:3]} have no entries (shape with a 0).")
    return {n: _own_memory(t.detach().resolve_neg()) for n, t in nonempty.items()}  # a negative bit: see as_inputs


def _own_memory(t: Tensor) -> Tensor:
    """``t``, or a contiguous copy where entries share memory (an expanded view, stride 0): forward mode's dual
    tensors cannot be made of one (NTK-vector products failed inside torch), and its entries are parameters each."""
    shared = any(stride == 0 and size > 1 for stride, size in zip(t.stride(), t.shape, strict=True))
    return t.contiguous() if shared else t


def _refuse_buffers(model: nn.Module, values: Mapping[str, Any]) -> None:
    """``ValueError`` for a ``params`` dict holding buffers (a whole ``state_dict()``): they were differentiated as
    if parameters, silently (0.14 off the parameters' NTK, and torch-native only: structured derivatives refused)."""
    buffers = [n for n in values if n in dict(model.named_buffers())]
    if buffers:
        raise ValueError(
            f"params holds buffers {buffers[:3]}: θ is the model's parameters, and buffers are used as the model "
            "holds them. Pass only the parameters, e.g. params={k: v for k, v in state_dict.items() if k in "
            "dict(model.named_parameters())} (load other buffer values into the model first: "
            "model.load_state_dict(state_dict)); to differentiate with respect to a buffer, make it an nn.Parameter."
        )


def check_input_count(model: nn.Module, count: int, name: str, from_dataset: bool = False) -> None:
    """``count`` input tensors must fit ``model.forward``'s positional arguments: a tuple given to a one-input
    model (or one tensor to a multi-input model) is named as such instead of failing inside the forward; for a
    dataset (``from_dataset``) the fix is ``input_key``: the integer target of an (inputs, target) item would be
    taken for a second input."""
    try:
        signature = inspect.signature(model.forward)
    except (TypeError, ValueError):  # a builtin or an unusual callable: the probe forward will tell
        return
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    positional = [p for p in signature.parameters.values() if p.kind in kinds]
    required = [p for p in positional if p.default is inspect.Parameter.empty]
    variadic = any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in signature.parameters.values())
    if len(required) <= count and (variadic or count <= len(positional)):
        return
    arguments = ", ".join(p.name for p in positional)
    given = "one tensor" if count == 1 else f"a tuple of {count} tensors"
    if from_dataset:
        given = f"a dataset whose items hold {count} tensor(s)"
        fix = "select the model's inputs of an item, e.g. DatasetInputs(dataset, input_key=0) for (inputs, target)"
    elif len(required) > count:
        fix = f"pass a tuple of {len(required)} tensors, {name}=({', '.join(p.name for p in required)}), each (N, ...)"
    elif len(positional) == 1:
        fix = f"pass a single tensor (a tuple means one tensor per forward argument), e.g. {name}=torch.cat(...)"
    else:
        fix = f"pass a tuple of at most {len(positional)} tensors, one per forward argument"
    raise ValueError(
        f"{name} is {given} but {type(model).__name__}.forward takes {len(required)}"
        f"{'' if len(required) == len(positional) else f' to {len(positional)}'} input(s) ({arguments}); {fix}."
    )


def prepare(
    model: nn.Module,
    x1: Inputs,
    x2: Inputs | None,
    *,
    params: ParamSelection,
    trace_axes: Any,
    diagonal_axes: Any,
    names: tuple[str, str] = ("x1", "x2"),
) -> NTKProblem:
    """Validate everything, then probe the model on two examples for its output shape and the assumptions every
    method makes (:func:`torchntk._probe.probe_output`): batch kept, outputs not empty, inputs not written to,
    examples independent, forward deterministic."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
    refuse_wrappers(model)
    check_model_mode(model)
    refuse_inference_weights(model)
    inputs1 = as_inputs(x1, names[0])
    inputs2 = None if x2 is None else as_inputs(x2, names[1])
    if inputs2 is not None:
        check_same_examples(inputs1, inputs2, names)
    theta = select_params(model, params)
    refuse_gradient_hooks(model, theta)
    device = next(iter(theta.values())).device
    dtype = next(iter(theta.values())).dtype
    # The model's floating dtypes, not only the selected parameters': a float64 head selected over a float32 body
    # takes float32 inputs (the first selected parameter's dtype refused them, with a fix that broke the body).
    weights = [*model.parameters(), *model.buffers(), *theta.values()]
    dtypes = {w.dtype for w in weights if w.is_floating_point()}
    first = next((w.dtype for w in model.parameters() if w.is_floating_point()), dtype)
    place(inputs1 + (inputs2 or ()), device)  # dataset inputs are read onto the parameters' device
    for i, t in enumerate(inputs1):
        if t.device != device:
            raise ValueError(f"input {i} is on {t.device} but the parameters are on {device}; move it with .to().")
        if t.is_floating_point() and t.dtype not in dtypes:
            raise TypeError(
                f"input {i} is {t.dtype} but the model's weights are {first}; cast the inputs (x.to({first})) or "
                f"the model (model.to({t.dtype}))."
            )
    check_input_count(model, len(inputs1), names[0], from_dataset=isinstance(inputs1[0], DatasetColumn))
    aliases = parameter_aliases(model)
    # The probe's forwards run on copies of the buffers and parameters: a forward that updates running statistics
    # (InstanceNorm(track_running_stats=True) in training mode) or initialises itself through ``.data`` (ActNorm) is
    # refused without having changed the model. (Memory: one more copy of the weights, for the probe's duration.)
    # The tensors its modules hold otherwise are copies too (their writes refused alike), and what the forwards
    # assign is recorded: a tensor computed from the parameters that no forward recomputes is refused after.
    refuse_cached_parametrizations(model)
    state = {name: b.clone() for name, b in model.named_buffers()}
    state |= {name: t.detach().clone() for name, t in {**dict(model.named_parameters()), **theta}.items()}
    recomputed: set[str] = set()
    references: list[str] = []

    conventions, watched, reached = BackwardConventions(state.values()), set(), []
    canonical = canonical_names(model)

    def forward(inputs: tuple[Tensor, ...]) -> Tensor:
        # The first forward of each input shape (x2's may take another path) is watched op by op. Forwards run in
        # grad mode, as the methods run the NTK's function; nothing here requires grad, as every parameter is
        # swapped for a copy that does not: a graph that reaches a model's Parameter found it past the swap.
        shapes = tuple(tuple(x.shape[1:]) for x in inputs)
        new_shape = shapes not in watched
        watched.add(shapes)
        with conventions if new_shape else contextlib.nullcontext(), torch.enable_grad():
            out = functional_forward(model, aliases, state, inputs, record=recomputed)
        reached.extend(n for n in parameters_reached(out, model) if canonical[n] in theta)  # θ's: others constant
        return out.detach() if isinstance(out, Tensor) else out

    def find_references(module: nn.Module, args: Any) -> None:  # inside the swap (see references_to_parameters)
        references[:] = references_to_parameters(model)

    hook = model.register_forward_pre_hook(find_references)
    float64 = float64_forward(model, aliases, theta)  # θ's values: params= may give others than the model's

    def referee(inputs: tuple[Tensor, ...]) -> Tensor:  # its copy holds the hook above: what it finds is not ours
        found = list(references)
        try:
            return float64(inputs)
        finally:
            references[:] = found

    try:
        with tensor_attributes_copied(model) as held, integer_inputs_named(inputs1, first):
            probe = probe_output(forward, inputs1, inputs2, {**state, **held}, names, referee)
    finally:
        hook.remove()
    refuse_stale_tensors(model, recomputed, references + [f"a path to {name}" for name in reached])
    trace, diag = canonicalize_axes(probe.ndim, trace_axes, diagonal_axes)
    problem = NTKProblem(
        model,
        theta,
        inputs1,
        inputs2,
        tuple(probe.shape[1:]),
        probe.dtype,
        trace,
        diag,
        aliases,
        conventions.scaled_lookups > 0,
        conventions.forward_mode_differs(),
        frozenset(conventions.derived_dtypes),
    )
    if problem.paired and problem.n1 != problem.n2:
        raise ValueError(
            f"diagonal_axes holds the batch axis 0, which needs N1 == N2, but x1 has {problem.n1} examples and x2 "
            f"{problem.n2}."
        )
    problem.kernel_shape()  # raises on traced/diagonal axes of unequal sizes
    return problem
