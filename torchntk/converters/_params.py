"""Which torch parameters become inputs of the converted function (the NTK differentiates with respect to them)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from torchntk._problem import canonical_names

from .errors import ConversionError

ParamSpec = None | Sequence[str] | Mapping[str, torch.Tensor]


def select_params(model: torch.nn.Module, params: ParamSpec = None) -> tuple[tuple[str, ...], dict[str, torch.Tensor]]:
    """Resolve a parameter selection to ``(names, values)``.

    ``params=None`` selects every parameter with ``requires_grad=True``; a sequence of names selects those; a mapping
    ``name -> tensor`` selects its keys and uses its tensors as values (shapes and dtypes must match the model's).
    Tied parameters appear once, under the first name ``named_parameters()`` gives them; names are returned in
    ``named_parameters()`` order whatever order the caller used. Values are detached.
    """
    canonical = canonical_names(model)
    own = dict(model.named_parameters())
    if params is None:
        chosen = [n for n, p in own.items() if p.requires_grad]
        overrides: Mapping[str, torch.Tensor] = {}
    else:
        if isinstance(params, str):
            raise TypeError(f"params must be a list of names or a dict, not the string {params!r}; pass [{params!r}].")
        overrides = params if isinstance(params, Mapping) else {}
        chosen = []
        for name in params:
            if name not in canonical:
                what = "a buffer" if name in dict(model.named_buffers()) else "not a parameter"
                raise ConversionError(
                    f"params selects {name!r}, which is {what} of {type(model).__name__}: a conversion takes the "
                    f"derivative by parameters only; valid names include {list(own)[:5]} (see "
                    "model.named_parameters()). Use implementation='jacobian_contraction' or 'ntk_vector_products' "
                    "for a kernel by buffers too."
                )
            chosen.append(canonical[name])
    if not chosen:
        raise ConversionError("No parameter is selected: pass params=[...] or set requires_grad=True on some.")
    order = {n: i for i, n in enumerate(own)}
    names = tuple(sorted(set(chosen), key=order.__getitem__))
    values = {n: own[n].detach() for n in names}
    for name, value in overrides.items():
        ref = own[canonical[name]]
        if not isinstance(value, torch.Tensor) or value.shape != ref.shape or value.dtype != ref.dtype:
            got = (tuple(value.shape), value.dtype) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ConversionError(
                f"params[{name!r}] is {got}, but the model's parameter is {(tuple(ref.shape), ref.dtype)}; "
                "pass a tensor of the same shape and dtype."
            )
        values[canonical[name]] = value.detach()
    return names, values
