"""Validated inputs of one NTK computation, shared by every implementation.

:func:`prepare` checks what the user passed (model mode, input shapes and dtypes, parameter selection, axes) and
raises an error that names the problem and the fix; the implementations then trust an :class:`NTKProblem`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from torchntk._axes import canonicalize_axes, kernel_shape
from torchntk._data import DatasetInputs, dataset_columns, is_dataset, place

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

    def forward(self, params: dict[str, Tensor], inputs: tuple[Tensor, ...]) -> Tensor:
        """The model's forward with θ replaced by ``params`` (buffers and unselected parameters its own)."""
        return functional_forward(self.model, self.aliases, params, inputs)

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


def functional_forward(
    model: nn.Module, aliases: dict[str, tuple[str, ...]], params: dict[str, Tensor], inputs: tuple[Tensor, ...]
) -> Tensor:
    """``model(*inputs)`` with the parameters in ``params`` (canonical names) replaced, every alias included."""
    full = {alias: value for name, value in params.items() for alias in aliases.get(name, (name,))}
    return torch.func.functional_call(model, full, inputs, tie_weights=False, strict=False)


def as_inputs(x: Inputs, name: str) -> tuple[Tensor, ...]:
    """``x`` as a non-empty tuple of floating tensors sharing a non-empty batch axis (or a dataset's columns)."""
    if is_dataset(x):
        return dataset_columns(x, name)
    inputs = (x,) if isinstance(x, Tensor) else tuple(x)
    if not inputs:
        raise ValueError(f"{name} is an empty tuple; pass a tensor of shape (N, ...) or a tuple of such tensors.")
    for i, t in enumerate(inputs):
        where = name if len(inputs) == 1 else f"{name}[{i}]"
        if not isinstance(t, Tensor):
            raise TypeError(f"{where} is a {type(t).__name__}, not a torch.Tensor; convert it with torch.as_tensor.")
        if t.ndim == 0:
            raise ValueError(f"{where} is a scalar; inputs need a batch axis: pass shape (N, ...), e.g. x[None].")
        if not (t.is_floating_point() or t.is_complex()):
            raise TypeError(
                f"{where} has dtype {t.dtype}; the NTK differentiates a model of floating inputs. "
                f"Pass a float tensor (e.g. {where}.float()), or wrap an embedding model so it takes floats."
            )
        if t.shape[0] == 0:
            raise ValueError(f"{where} has an empty batch (shape {tuple(t.shape)}); pass at least one example.")
        if t.shape[0] != inputs[0].shape[0]:
            raise ValueError(
                f"{name} holds tensors with different batch sizes {[tuple(u.shape) for u in inputs]}; "
                "every input of a multi-input model needs the same number of examples on axis 0."
            )
    return inputs


def check_same_examples(x1: tuple[Tensor, ...], x2: tuple[Tensor, ...]) -> None:
    """``x1`` and ``x2`` must hold examples of the same kind (count, per-example shape, dtype, device)."""
    if len(x1) != len(x2):
        raise ValueError(f"x1 has {len(x1)} input tensors and x2 has {len(x2)}; pass the same inputs for both.")
    for i, (a, b) in enumerate(zip(x1, x2, strict=True)):
        if a.shape[1:] != b.shape[1:]:
            raise ValueError(
                f"x1 and x2 examples differ in shape: input {i} has per-example shape {tuple(a.shape[1:])} in x1 "
                f"and {tuple(b.shape[1:])} in x2; both batches must hold examples of the same shape."
            )
        if a.dtype != b.dtype or a.device != b.device:
            raise ValueError(
                f"input {i} is {a.dtype} on {a.device} in x1 but {b.dtype} on {b.device} in x2; "
                "move both to the same dtype and device."
            )


def check_model_mode(model: nn.Module) -> None:
    """Refuse training mode where it makes examples interact (BatchNorm) or random (Dropout)."""
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


def select_params(model: nn.Module, params: ParamSelection) -> dict[str, Tensor]:
    """θ as a dict ``name -> tensor`` (detached), from the selection rules of :func:`torchntk.ntk`."""
    named = dict(model.named_parameters())
    if params is None:
        chosen = {n: p for n, p in named.items() if p.requires_grad}
        what = "the model has no parameter with requires_grad=True"
    elif isinstance(params, Mapping):
        unknown = [n for n in params if n not in named and n not in dict(model.named_buffers())]
        if unknown:
            raise ValueError(f"params holds names {unknown} that the model does not have; known: {list(named)[:8]}")
        for n, t in params.items():
            if not isinstance(t, Tensor) or not t.is_floating_point():
                raise TypeError(f"params[{n!r}] must be a floating torch.Tensor, got {type(t).__name__}.")
            if n in named and t.shape != named[n].shape:
                raise ValueError(f"params[{n!r}] has shape {tuple(t.shape)}, the model's has {tuple(named[n].shape)}.")
        chosen = dict(params)
        what = "params is an empty dict"
    elif callable(params):
        chosen = {n: p for n, p in named.items() if params(n, p)}
        what = "the params predicate selected no parameter"
    elif isinstance(params, str):
        raise TypeError(f"params={params!r} is a string; pass a list of names, e.g. params=[{params!r}].")
    else:
        names = list(params)
        unknown = [n for n in names if n not in named]
        if unknown:
            raise ValueError(f"params names {unknown} are not parameters of the model; known: {list(named)[:8]}")
        chosen = {n: named[n] for n in names}
        what = "params is an empty list"
    if not chosen:
        raise ValueError(f"no parameter selected: {what}. Select at least one parameter (params=None takes all).")
    return {n: t.detach() for n, t in chosen.items()}


def prepare(
    model: nn.Module,
    x1: Inputs,
    x2: Inputs | None,
    *,
    params: ParamSelection,
    trace_axes: Any,
    diagonal_axes: Any,
) -> NTKProblem:
    """Validate everything and probe the model once on one example of ``x1`` for its output shape."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
    check_model_mode(model)
    inputs1 = as_inputs(x1, "x1")
    inputs2 = None if x2 is None else as_inputs(x2, "x2")
    if inputs2 is not None:
        check_same_examples(inputs1, inputs2)
    theta = select_params(model, params)
    device = next(iter(theta.values())).device
    dtype = next(iter(theta.values())).dtype
    place(inputs1 + (inputs2 or ()), device)  # dataset inputs are read onto the parameters' device
    for i, t in enumerate(inputs1):
        if t.device != device:
            raise ValueError(f"input {i} is on {t.device} but the parameters are on {device}; move it with .to().")
        if t.is_floating_point() and t.dtype != dtype:
            raise TypeError(
                f"input {i} is {t.dtype} but the parameters are {dtype}; cast the inputs (x.to({dtype})) or the "
                f"model (model.to({t.dtype}))."
            )
    aliases = parameter_aliases(model)
    with torch.no_grad():
        probe = functional_forward(model, aliases, theta, tuple(t[:1] for t in inputs1))
    if not isinstance(probe, Tensor):
        raise TypeError(
            f"the model returned a {type(probe).__name__}; torchntk needs one tensor of shape (N, *out). Wrap the "
            "model in a module that returns the output you want the NTK of."
        )
    if probe.ndim == 0 or probe.shape[0] != 1:
        raise ValueError(
            f"for one example the model returned shape {tuple(probe.shape)}; the output needs the batch axis first, "
            "shape (N, *out)."
        )
    if not probe.is_floating_point():
        raise TypeError(f"the model's output has dtype {probe.dtype}; the NTK needs a floating output.")
    trace, diag = canonicalize_axes(probe.ndim, trace_axes, diagonal_axes)
    problem = NTKProblem(model, theta, inputs1, inputs2, tuple(probe.shape[1:]), probe.dtype, trace, diag, aliases)
    if problem.paired and problem.n1 != problem.n2:
        raise ValueError(
            f"diagonal_axes holds the batch axis 0, which needs N1 == N2, but x1 has {problem.n1} examples and x2 "
            f"{problem.n2}."
        )
    problem.kernel_shape()  # raises on traced/diagonal axes of unequal sizes
    return problem
