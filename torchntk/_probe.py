"""What torchntk assumes of a model's forward, checked on a few examples before any derivative is taken.

Every NTK method differentiates ``f(θ, x)`` one example at a time (vmap over the batch, or per-example tiles),
so the kernel is only right when the forward of a batch is the stack of the forwards of its examples. A model that
breaks this silently changes the numbers, so :func:`probe_output` runs the forward on up to four distinct examples
(and on each of them alone) and refuses, naming the cause and the fix, a forward that

- does not return one floating tensor with the batch axis first (e.g. ``out.sum(0, keepdim=True)``, ``out[:1]``),
- returns no output entries at all (``num_classes=0``: torch's autograd dies with SIGFPE on it),
- writes into its inputs (``x.mul_(2)``, ``x += 1``: the caller's tensors would change and repeated forwards
  would compound; seen by version counter, also where these examples' values stay) or into the model's own
  buffers and parameters (a call counter: the function would move; through ``.data`` too, seen by value),
- draws random numbers (``F.dropout(x, training=True)``: the generator's state moves), or couples the
  examples of a batch (batch statistics such as a hand-written ``x - x.mean(0)`` or a custom batch norm).

The probes cost one forward of up to four examples and as many of one (one more only when those disagree), whatever
the batch sizes. Where float32 forwards disagree beyond their tolerance, a float64 copy of the model tells rounding
from coupling (the examples' outputs, together and alone, in float64).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from torchntk._precision import in_float32_everywhere

Forward = Callable[[tuple[Tensor, ...]], object]

# Relative agreement expected between a two-example forward and two one-example forwards: batched kernels (BLAS,
# convolution algorithms) sum in other orders, so some thousand ulps of the output's scale; batch statistics
# differ at order one. TF32 matmuls/convolutions on a GPU keep 10 mantissa bits (float16's): their tolerance.
_AGREEMENT = {torch.float64: 1e-9, torch.float32: 1e-3}
_AGREEMENT_LOW = 3e-2  # float16, bfloat16, TF32


def _tolerance(out: Tensor, dtypes: set[torch.dtype]) -> float:
    """The agreement expected of the least precise of ``dtypes`` (the weights', inputs' and output's: a float32 body
    under a float64 head rounds as float32)."""
    tolerances = []
    for dtype in dtypes:
        if dtype == torch.float32 and out.device.type == "cuda" and not in_float32_everywhere():
            tolerances.append(_AGREEMENT_LOW)
        else:
            tolerances.append(_AGREEMENT.get(dtype, _AGREEMENT_LOW))
    return max(tolerances)


_RANDOM = (
    "the model's forward is random: it draws random numbers or gives the same example different outputs (a write "
    "into a tensor it reads on each call, such as a helper's global or a default argument's; dropout in training "
    "mode, e.g. F.dropout(x, training=True) or F.dropout(x, training=self.training) with the model in training "
    "mode, or noise drawn in forward). The NTK of a random function is not defined: call model.eval(), "
    "or make the randomness a fixed input. (The random generators are process-wide: another thread drawing "
    "random numbers during this check looks the same; call torchntk while no other thread draws.)"
)


def _rng_states(device: torch.device) -> list[Tensor]:
    """The generators a forward on ``device`` may draw from: the CPU's, and the device's own."""
    states = [torch.random.get_rng_state()]
    if device.type == "cuda":
        states.append(torch.cuda.get_rng_state(device))
    return states


#: Examples the probe forwards together and one by one: distinct ones where the inputs have them (batch statistics
#: of equal examples are their own values: BatchNorm without running statistics passed on two equal examples).
PROBED = 4
_SCANNED = 64  # rows looked at for distinct examples: the first, and as many spread over the batch


def _examples(inputs1: tuple[Tensor, ...], inputs2: tuple[Tensor, ...] | None) -> tuple[Tensor, ...]:
    """Up to :data:`PROBED` distinct examples of ``x1`` (then ``x2``); ``x1[0]`` twice where there is no other (the
    forwards get copies of them)."""
    rows: list[tuple[Tensor, ...]] = []
    for batch in (inputs1,) if inputs2 is None else (inputs1, inputs2):
        n = batch[0].shape[0]  # the first rows, then rows spread over the whole batch (leading duplicates)
        for i in dict.fromkeys([*range(min(n, _SCANNED)), *range(0, n, max(1, n // _SCANNED))]):
            row = tuple(t[i : i + 1] for t in batch)
            if not any(all(torch.equal(a, b) for a, b in zip(row, kept, strict=True)) for kept in rows):
                rows.append(row)
            if len(rows) == PROBED:
                break
        if len(rows) == PROBED:
            break
    if len(rows) == 1:
        rows.append(rows[0])
    return tuple(torch.cat(column) for column in zip(*rows, strict=True))


def _checksums(state: dict[str, Tensor]) -> dict[str, tuple[float, float]]:
    """Each tensor's sum and Euclidean norm, accumulated in float64 (a float64 copy only of integer tensors): what a
    write changes."""
    sums = {}
    for name, t in state.items():
        v = torch.view_as_real(t.detach()) if t.is_complex() else t.detach()
        if not v.is_floating_point():  # integer buffers (counters) are small: a float64 copy costs little
            v = v.double()
        sums[name] = (float(v.sum(dtype=torch.float64)), float(torch.linalg.vector_norm(v, dtype=torch.float64)))
    return sums


def _moved(a: tuple[float, float], b: tuple[float, float]) -> bool:
    return any(x != y and not (math.isnan(x) and math.isnan(y)) for x, y in zip(a, b, strict=True))


def _same(a: Tensor, b: Tensor) -> bool:
    """Bitwise the same values, NaNs at the same places included."""
    return a.shape == b.shape and bool(((a == b) | (a.isnan() & b.isnan())).all())


def _disagreement(a: Tensor, b: Tensor, scale: Tensor | None = None) -> float:
    """The largest ``|a - b|`` over each output's own scale over the examples (a large output elsewhere, a regression
    head of scale 2000, hid a coupling of 0.3 in another) plus ``|b|``, that scale not below a thousandth of the
    largest output's (the scales of ``scale``, else of ``b``); 0 where equal or NaN in both, infinite where NaN in
    one."""
    scale = b if scale is None else scale
    magnitude = torch.where(scale.isfinite(), scale.abs(), 0).amax(dim=0)
    floor = 1e-3 * float(magnitude.max()) if magnitude.numel() else 0.0
    gap = ((a - b).abs() - torch.finfo(a.dtype).tiny).clamp(min=0)
    ratio = gap / (torch.clamp(magnitude, min=floor) + scale.abs())
    # within torch's smallest normal number (gap 0) counts as equal, also where every output is 0 (0 / 0)
    ratio = torch.where((gap == 0) | (a == b) | (a.isnan() & b.isnan()), 0.0, ratio.nan_to_num(nan=math.inf))
    return float(ratio.max()) if ratio.numel() else 0.0


def _agree(a: Tensor, b: Tensor, dtypes: set[torch.dtype]) -> bool:
    """Within the tolerance of the least precise dtype (:func:`_disagreement`)."""
    return _disagreement(a, b) <= _tolerance(a, dtypes | {a.dtype})


#: Where float32 (or lower) forwards of examples together and one by one disagree but a float64 copy of the model
#: shows no coupling, the most they may disagree (relative to the float64 outputs' scale): a model that computes
#: otherwise in float32 (code that branches on the dtype) may couple its examples up to this much unseen.
ROUNDING_WIDEST = 1e-2


def _rounding_refusal(
    out: Tensor, alone: Tensor, pair: tuple[Tensor, ...], referee: Forward | None, tolerance: float
) -> str | None:
    """``None`` where the float64 referee shows that the disagreement of ``out`` (batched) and ``alone`` (one by one)
    is rounding, else why the model is refused. The referee (the model in float64, on float64 copies of ``pair``)
    must give equal outputs both ways (else the examples are coupled), and the float32 forwards may then disagree by
    up to :data:`ROUNDING_WIDEST` of the float64 outputs' scale: a difference of two nearly equal sums of thousands of
    terms, accurate to float32, was refused as coupled."""
    if referee is None:
        return _COUPLED
    try:
        exact = referee(pair).double()
        exact_alone = torch.cat([referee(tuple(t[i : i + 1] for t in pair)).double() for i in range(len(alone))])
    except Exception:  # noqa: BLE001 - a model that does not run in float64: the float32 verdict stands
        return _COUPLED
    if exact.shape != out.shape or exact_alone.shape != alone.shape:
        return _COUPLED
    if _disagreement(exact, exact_alone) > _AGREEMENT[torch.float64]:
        return _COUPLED
    gap = _disagreement(out.double(), alone.double(), exact)
    if gap <= max(tolerance, ROUNDING_WIDEST):
        return None
    rounding = max(_disagreement(out.double(), exact, exact), _disagreement(alone.double(), exact_alone, exact))
    return (
        f"the model's examples forwarded together and one by one differ by {gap:.1e} relative in {out.dtype}, more "
        f"than the {ROUNDING_WIDEST:g} allowed, while a float64 copy of the model shows no coupling and the "
        f"{out.dtype} outputs are {rounding:.1e} from its: float32 rounding (outputs that are small differences of "
        "large terms) or code that computes otherwise in float32 (batch statistics for float32 inputs only). Where it "
        "is rounding, compute in float64 (model.double() and x.double()); otherwise keep the examples independent."
    )


_COUPLED = (
    "the model's examples are coupled: examples forwarded together give other outputs than each "
    "forwarded alone (batch statistics, e.g. x - x.mean(0), a custom batch norm, attention across "
    "the batch axis, or an output that depends on the batch size, x.shape[0]). The NTK is defined per "
    "example; use per-example normalization (GroupNorm, LayerNorm, BatchNorm in eval mode) or compute "
    "statistics once and pass them as buffers."
)


def _check_output(out: object, count: int) -> Tensor:
    if not isinstance(out, Tensor):
        raise TypeError(
            f"the model returned a {type(out).__name__}; torchntk needs one tensor of shape (N, *out). Wrap the "
            "model in a module that returns the output you want the NTK of."
        )
    if out.is_nested or out.layout != torch.strided:
        kind = "nested" if out.is_nested else str(out.layout).removeprefix("torch.")
        raise TypeError(
            f"the model returned a {kind} tensor; torchntk needs a dense tensor of shape (N, *out). Return "
            f"{'out.to_padded_tensor(0.0)' if out.is_nested else 'out.to_dense()'} (in the model or a wrapper)."
        )
    if out.ndim == 0 or out.shape[0] != count:
        raise ValueError(
            f"for {count} examples the model returned shape {tuple(out.shape)}: the output must keep the batch, shape "
            "(N, *out) with one row per example. A forward that reduces or slices the batch axis (out.sum(0), "
            "out[:1], a mean over examples) has no per-example NTK; return per-example outputs and reduce the "
            "kernel afterwards."
        )
    if out.is_complex() or not out.is_floating_point():
        raise TypeError(
            f"the model's output has dtype {out.dtype}; the NTK needs a real floating output (for a complex one, "
            "return torch.view_as_real(out))."
        )
    if out.numel() == 0:
        raise ValueError(
            f"the model has no outputs: one example gives shape {tuple(out.shape[1:])} (e.g. num_classes=0 or a "
            "Linear(..., 0) head). The NTK of an empty output is empty; give the model at least one output."
        )
    return out


def probe_output(
    forward: Forward,
    inputs1: tuple[Tensor, ...],
    inputs2: tuple[Tensor, ...] | None,
    state: dict[str, Tensor] | None = None,
    names: tuple[str, str] = ("x1", "x2"),
    referee: Forward | None = None,
) -> Tensor:
    """The model's output for one example, ``Tensor[1, *out]``, after checking the assumptions above.

    ``forward(inputs)`` runs the model (θ already bound) on a tuple of batched input tensors; it is called under
    ``torch.no_grad`` on copies, so the caller's tensors are never written to. ``state`` (the model's buffers and
    parameters by name, copies) must not be written to by the forward either: their version counters tell, and their
    values for ``.data`` writes. ``names``: what the caller calls the two batches. ``referee(inputs)``, where given,
    runs a float64 copy of the model on float64 copies of the inputs: where float32 forwards disagree, it tells
    rounding from coupling (:func:`_rounding_refusal`); it runs only then.
    """
    if inputs2 is not None and any(a.shape[1:] != b.shape[1:] for a, b in zip(inputs1, inputs2, strict=True)):
        # examples of two shapes (token sequences of two lengths, images of two sizes) cannot be forwarded together:
        # each batch is probed on its own, and both must give one output shape (Θ's layout has one)
        n1, n2 = names
        outs = []
        for batch, other, name, other_name in ((inputs1, inputs2, n1, n2), (inputs2, inputs1, n2, n1)):
            try:
                outs.append(probe_output(forward, batch, None, state, referee=referee))
            except RuntimeError as error:  # torch's shape errors (mat1 and mat2 shapes cannot be multiplied)
                if not outs:  # the first batch failed: does the model run on the other at all?
                    probe_output(forward, other, None, state, referee=referee)
                raise ValueError(
                    f"the model runs on {other_name}'s examples (input shapes {[tuple(t.shape[1:]) for t in other]}) "
                    f"but fails on {name}'s ({[tuple(t.shape[1:]) for t in batch]}): "
                    f"{str(error).splitlines()[0][:200]}. {n1} and {n2} may differ in shape only where the model "
                    "takes both shapes; pass examples of the shape it takes."
                ) from error
        out1, out2 = outs
        if out1.shape != out2.shape:
            raise ValueError(
                f"{n1}'s examples (input shapes {[tuple(t.shape[1:]) for t in inputs1]}) give outputs of shape "
                f"{tuple(out1.shape[1:])} but {n2}'s ({[tuple(t.shape[1:]) for t in inputs2]}) give "
                f"{tuple(out2.shape[1:])}; torchntk needs one output shape for both batches. Pool or crop the "
                "outputs to a common shape in the model (e.g. a mean over the sequence axis)."
            )
        return out1
    pair = _examples(inputs1, inputs2)
    device = pair[0].device
    versions = {name: t._version for name, t in (state or {}).items()}
    sums = _checksums(state or {})
    with torch.no_grad(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        before = _rng_states(device)
        copies = tuple(t.clone() for t in pair)
        copy_versions = [t._version for t in copies]
        out = forward(copies)
        if not all(torch.equal(a, b) for a, b in zip(before, _rng_states(device), strict=True)):
            raise ValueError(_RANDOM)
        # ``.data`` writes (an ActNorm's data-dependent initialisation) leave the version counter alone: values tell
        changed = [name for name, version in versions.items() if state[name]._version != version]
        changed += [
            name for name, value in _checksums(state or {}).items() if _moved(value, sums[name]) and name not in changed
        ]
        if changed:
            raise ValueError(
                f"the model's forward writes into its own state in place ({', '.join(changed[:3])}: a counter, a "
                "running statistic, a cache, a data-dependent initialisation through .data), so every forward "
                "would change the model (the probe ran on copies of its buffers and parameters) and the NTK is of a "
                "moving function. Keep that update out of forward (or under `if self.training:` with the model in "
                "eval mode); for a data-dependent initialisation, run the model once yourself first."
            )
        # by version counter too: a write that leaves these two examples' values as they were (x[x > 1] *= 2,
        # x.clamp_(min=0)) still changes others, and the caller's tensors
        written = [
            i
            for i, (t, copy, version) in enumerate(zip(pair, copies, copy_versions, strict=True))
            if not _same(t, copy) or copy._version != version
        ]
        if written:
            raise ValueError(
                f"the model's forward writes into its input {written[0]} in place (e.g. x.mul_(2), x += 1, "
                "x.clamp_()): torchntk would change your tensors and repeated forwards would compound. Write it "
                "out of place (x = x * 2), or start the forward with x = x.clone()."
            )
        out = _check_output(out, pair[0].shape[0])
        singles = [forward(tuple(t[i : i + 1].clone() for t in pair)) for i in range(pair[0].shape[0])]
        for single in singles:
            if isinstance(single, Tensor) and single.ndim and single.shape[0] != 1:
                _check_output(single, 1)  # one example in, not one row out: the batch axis was reduced
            if not isinstance(single, Tensor) or single.shape != (1, *out.shape[1:]):
                shape = tuple(single.shape) if isinstance(single, Tensor) else type(single).__name__
                raise ValueError(
                    f"the model's output for one example has shape {shape} but {tuple(out.shape)} for several: each "
                    "example's output must not depend on the batch size; return shape (N, *out)."
                )
        alone = torch.cat(singles)
        dtypes = {t.dtype for t in (*(state or {}).values(), *pair) if t.is_floating_point()}
        if not _agree(out, alone, dtypes):
            again = forward(tuple(t[:1].clone() for t in pair))
            if not _same(again, singles[0]):
                raise ValueError(_RANDOM)
            tolerance = _tolerance(out, dtypes | {out.dtype})
            low = tolerance > _AGREEMENT[torch.float64]  # float32 or lower somewhere: rounding may explain it
            refusal = _rounding_refusal(out, alone, pair, referee, tolerance) if low else _COUPLED
            if refusal is not None:
                raise ValueError(refusal)
    return out[:1]
