"""Indexing with indices known at conversion time, lowered to slices instead of ``gather``.

Exporters emit Gather/GatherND with constant indices for ``x[:, 0]``, adaptive average pooling and
``as_strided``. A ``gather`` primitive is awkward for the structured-derivatives interpreter downstream, so
index lists made of a few arithmetic runs become strided slices (plus a broadcast for repeated indices)
joined by one concatenate; only genuinely irregular index lists fall back to a single gather.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ._core import Value, is_static

# Above this many arithmetic runs a single gather is cheaper than a concatenate of slices.
MAX_RUNS = 16


def arithmetic_runs(indices: np.ndarray) -> list[tuple[int, int, int]]:
    """Split a 1-D index list greedily into ``(start, count, step)`` runs of constant step."""
    runs: list[tuple[int, int, int]] = []
    i, n = 0, len(indices)
    while i < n:
        if i + 1 == n:
            runs.append((int(indices[i]), 1, 1))
            break
        step = int(indices[i + 1] - indices[i])
        j = i + 1
        while j + 1 < n and indices[j + 1] - indices[j] == step:
            j += 1
        runs.append((int(indices[i]), j - i + 1, step))
        i = j + 1
    return runs


def _repeat_factor(flat: np.ndarray) -> int:
    """f > 1 when ``flat`` is a list whose every element appears f times in a row, else 1."""
    f = int(np.argmax(flat != flat[0])) if (flat != flat[0]).any() else len(flat)
    if f > 1 and len(flat) % f == 0 and len(flat) > f and (flat.reshape(-1, f) == flat[::f, None]).all():
        return f
    return 1


def slice_run(x: Value, axis: int, start: int, count: int, step: int) -> Value:
    """Elements ``start, start + step, ...`` (``count`` of them) of ``x`` along ``axis`` with lax slicing."""
    if step == 0 or count == 1:
        one = lax.slice_in_dim(x, start, start + 1, axis=axis)
        shape = list(x.shape)
        shape[axis] = count
        return one if count == 1 else jnp.broadcast_to(one, shape)
    if step > 0:
        return lax.slice_in_dim(x, start, start + (count - 1) * step + 1, step, axis)
    last = start + (count - 1) * step
    return lax.rev(lax.slice_in_dim(x, last, start + 1, -step, axis), (axis,))


def take_static(x: Value, indices: np.ndarray, axis: int) -> Value:
    """``numpy.take(x, indices, axis)`` for static ``indices`` (negative ones count from the end)."""
    n = x.shape[axis]
    indices = np.where(indices < 0, indices + n, indices).astype(np.int64)
    if indices.size and (indices.min() < 0 or indices.max() >= n):
        raise IndexError(f"index out of range [0, {n}) on axis {axis}: {indices.min()}..{indices.max()}")
    if is_static(x):
        return np.take(x, indices, axis=axis)
    out_shape = x.shape[:axis] + indices.shape + x.shape[axis + 1 :]
    if indices.size == 0:
        return np.zeros(out_shape, x.dtype)  # empty: nothing to differentiate
    flat = indices.reshape(-1)
    repeat = _repeat_factor(flat)
    if repeat > 1:  # nearest-neighbour upsampling: take each distinct index once, then repeat by broadcasting
        y = take_static(x, flat[::repeat], axis)
        y = jnp.broadcast_to(jnp.expand_dims(y, axis + 1), y.shape[: axis + 1] + (repeat,) + y.shape[axis + 1 :])
        return y.reshape(out_shape)
    runs = arithmetic_runs(flat)
    if len(runs) > MAX_RUNS:
        return jnp.take(x, indices, axis=axis)
    parts = [slice_run(x, axis, *run) for run in runs]
    joined = parts[0] if len(parts) == 1 else lax.concatenate(parts, axis)
    return joined.reshape(out_shape)


def gather_nd_static(x: Value, indices: np.ndarray) -> Value:
    """ONNX GatherND with ``batch_dims=0`` and static indices: flatten the indexed axes, then take."""
    depth = indices.shape[-1]
    lead = x.shape[:depth]
    indices = np.where(indices < 0, indices + np.asarray(lead), indices)
    flat = np.ravel_multi_index(tuple(np.moveaxis(indices, -1, 0)), lead) if depth else np.zeros(indices.shape[:-1])
    flat_x = x.reshape((int(np.prod(lead)),) + x.shape[depth:])
    return take_static(flat_x, np.asarray(flat, np.int64), 0)


def slice_static(x: Value, axis: int, start: int, stop: int, step: int) -> Value:
    """``x[..., start:stop:step, ...]`` with Python (= ONNX Slice) clamping, as one lax slice (+ rev)."""
    selected = range(*slice(start, stop, step).indices(x.shape[axis]))
    if is_static(x):
        return np.take(x, np.asarray(selected, np.int64), axis=axis)
    if len(selected) == 0:
        shape = list(x.shape)
        shape[axis] = 0
        return np.zeros(shape, x.dtype)
    if len(selected) == x.shape[axis] and step == 1:
        return x
    return slice_run(x, axis, selected[0], len(selected), selected.step)


def scatter_nd_static(data: Value, indices: np.ndarray, updates: Value, reduction: str) -> Value:
    """ONNX ScatterND with static ``indices``, as a take from ``[data; updates]`` (``none``) or a sum (``add``).

    ``indices[..., :depth]`` address the leading ``depth`` axes of ``data``; ``updates`` has shape
    ``indices.shape[:-1] + data.shape[depth:]``. Writing position ``p`` is reading row ``p`` of the concatenation
    of the flattened ``data`` and ``updates``, so the result is linear in both with no ``scatter`` primitive
    (which the structured-derivatives interpreter downstream does not know). Repeated indices: the last update
    wins for ``none`` (ONNX leaves the order unspecified), and all of them add up for ``add``.
    """
    depth = indices.shape[-1]
    lead, tail = data.shape[:depth], data.shape[depth:]
    n_rows = int(np.prod(lead))
    indices = np.where(indices < 0, indices + np.asarray(lead), indices).reshape(-1, depth)
    if indices.size and ((indices < 0) | (indices >= np.asarray(lead))).any():
        raise IndexError(f"ScatterND index out of range for the leading axes {lead}")
    rows = np.ravel_multi_index(tuple(indices.T), lead) if depth else np.zeros(len(indices), np.int64)
    m = np if is_static(data) and is_static(updates) else jnp
    flat_data = m.reshape(data, (n_rows,) + tail)
    flat_updates = m.reshape(updates, (len(rows),) + tail).astype(data.dtype)
    if reduction == "add":
        # A static 0/1 matrix sums each row's updates: one dot_general, linear in ``updates``.
        onehot = np.zeros((n_rows, len(rows)), data.dtype)
        np.add.at(onehot, (rows, np.arange(len(rows))), 1)
        return (flat_data + m.tensordot(onehot, flat_updates, axes=1)).reshape(data.shape)
    source = np.arange(n_rows)
    source[rows] = n_rows + np.arange(len(rows))  # numpy assigns repeated indices in order: the last one wins
    joined = m.concatenate([flat_data, flat_updates], axis=0)
    return (take_static(joined, source, 0) if m is jnp else joined[source]).reshape(data.shape)


def scatter_nd_traced(data: Value, indices: Value, updates: Value, reduction: str) -> Value:
    """ONNX ScatterND whose ``indices`` depend on the graph inputs (``y[rows, ids] = h`` with a model's integer
    inputs), as :func:`scatter_nd_static` does it: the source row of every position is computed (an integer scatter
    of positions, which no parameter reaches), then taken from ``[data; updates]``; ``add`` by a segment sum.
    Indices out of range are clipped here; torch's forward raises on them, and the conversion's check runs torch on
    every example."""
    depth = indices.shape[-1]
    lead, tail = data.shape[:depth], data.shape[depth:]
    n_rows = int(np.prod(lead))
    flat = jnp.where(indices < 0, indices + jnp.asarray(lead, indices.dtype), indices).reshape(-1, depth)
    rows = jnp.ravel_multi_index(tuple(flat.T), lead, mode="clip") if depth else jnp.zeros(len(flat), jnp.int32)
    flat_data = jnp.reshape(data, (n_rows,) + tail)
    flat_updates = jnp.reshape(updates, (flat.shape[0],) + tail).astype(data.dtype)
    if reduction == "add":  # a segment sum: a 0/1 matrix of rows × writes took 9 GB at a 400k vocabulary
        return (flat_data + jax.ops.segment_sum(flat_updates, rows, num_segments=n_rows)).reshape(data.shape)
    source = jnp.arange(n_rows).at[rows].set(n_rows + jnp.arange(flat.shape[0]))
    return jnp.take(jnp.concatenate([flat_data, flat_updates]), source, axis=0).reshape(data.shape)
