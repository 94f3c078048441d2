"""Compatibility layer that lets onnx2tf 1.28.8 convert graphs whose *weights are graph inputs*.

onnx2tf was written for graphs with constant weights. With the NTK's weights-as-inputs graphs it fails in four
places, fixed here (each fix applies only to the weight-input case; constant-weight nodes take onnx2tf's own path):

1. ``Conv`` (plain, grouped, depthwise; 1-D/2-D/3-D) whose weight is a graph input: onnx2tf reads the kernel as a
   numpy constant (``IndexError`` in ``get_weights_constant_or_variable``) and builds grouped convs as Keras layers
   that need concrete weights. :func:`_conv_weight_input` builds the op from TF tensors: the kernel is transposed
   from torch's ``(O, I/g, *k)`` to TF's ``(*k, I/g, O)`` inside the graph, the activation is channel-last (as
   onnx2tf keeps it), padding is explicit, and grouped/depthwise convs are one grouped ``tf.nn.conv2d`` (tf2jax
   turns it into ``conv_general_dilated`` with ``feature_group_count``).
2. ``LayerNormalization`` with scale/bias graph inputs: onnx2tf uses a Keras layer with constant initialisers.
   :func:`_layer_norm_weight_input` builds it from TF ops, converting the axis as onnx2tf's op does. (Rewriting
   it as ONNX ReduceMean/Sub/... does not work: onnx2tf forgets after one op that a kept input is not
   transposed, so the second reduction would pick the wrong axis.)
3. ``MatMul``: onnx2tf searches transpositions of both operands against onnxruntime results, which on weight
   inputs picks wrong layouts or crashes TensorFlow (convnext_tiny). The search is switched off: operands already
   are in ONNX layout because every graph input keeps its torch shape (``keep_shape_absolutely_input_names``).
4. ``Transpose`` of a weight matrix (``nn.Linear`` on 3-D+ inputs exports ``MatMul(x, Transpose(W))``): onnx2tf
   guesses a non-batch-first permutation by matching shapes, which is the identity for a *square* W: the weight
   would silently not be transposed. :func:`_transpose_matrix` applies the ONNX permutation as written.

:func:`patched_onnx2tf` installs the fixes for the duration of one conversion, together with guards that keep
onnx2tf from reaching the network (its calibration-image download), from running ``nvidia-smi`` through PATH,
from changing ``CUDA_VISIBLE_DEVICES`` for the whole process, and from writing into the working directory.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import tempfile
from collections.abc import Iterator

import numpy as np

from .errors import ConversionError

# ---------------------------------------------------------------------------------------------------------------
# 1. Conv with a weight graph input


def _tf_value(var, tf_layers_dict):
    """The TF tensor for an onnx_graphsurgeon Variable (already converted) or Constant."""
    import tensorflow as tf

    if hasattr(var, "values"):  # gs.Constant
        return tf.convert_to_tensor(np.asarray(var.values))
    return tf_layers_dict[var.name]["tf_node"]


def _channel_last(x, onnx_shape: list, k: int):
    """Return ``x`` channel-last; onnx2tf keeps 3-5-D activations channel-last, except tensors it has not yet
    transposed (graph inputs kept in torch layout), recognisable because their TF shape still equals the ONNX
    shape. When every non-batch axis has the same size the two layouts are indistinguishable; like onnx2tf's own
    Conv, treat the tensor as already channel-last."""
    import tensorflow as tf

    tf_shape = list(x.shape)
    channel_last = [onnx_shape[0], *onnx_shape[2:], onnx_shape[1]]
    if tf_shape == onnx_shape and len(set(onnx_shape[1:])) > 1:
        return tf.transpose(x, [0, *range(2, k + 2), 1])
    if tf_shape != channel_last:
        raise ConversionError(
            f"Conv input has TF shape {tf_shape}, which is neither the ONNX shape {onnx_shape} nor its channel-last "
            'form; onnx2tf lost track of the layout before this convolution. Use route="onnx-jax".'
        )
    return x


def _torch_layout_weight(w_var, tf_layers_dict):
    """The Conv weight as a TF tensor in torch layout ``(O, I/g, *k)``. Graph inputs kept in torch layout
    (``keep_shape_absolutely_input_names``) come as they are; weights computed in the graph are channel-last
    when onnx2tf says so (their TF shape is the channel-last permutation of the ONNX shape)."""
    import tensorflow as tf

    w = _tf_value(w_var, tf_layers_dict)
    onnx_shape, tf_shape = list(w_var.shape), list(w.shape)
    channel_last = [onnx_shape[0], *onnx_shape[2:], onnx_shape[1]]
    entry = tf_layers_dict.get(w_var.name, {})
    kept_input = entry.get("optype") == "Input" and entry.get("ncw_nchw_ncdhw_perm") == list(range(len(onnx_shape)))
    if kept_input or (tf_shape == onnx_shape and tf_shape != channel_last):
        return w
    if tf_shape == channel_last and tf_shape != onnx_shape:
        return tf.transpose(w, [0, len(tf_shape) - 1, *range(1, len(tf_shape) - 1)])
    raise ConversionError(
        f"Conv weight {w_var.name!r} (ONNX shape {onnx_shape}, TF shape {tf_shape}) is computed in the graph and its "
        'layout is ambiguous for onnx2tf. Use route="onnx-jax".'
    )


def _conv_weight_input(*, graph_node, tf_layers_dict, **kwargs) -> None:
    """onnx2tf ``make_node`` for a Conv whose weight is not a constant (see module docstring, fix 1)."""
    import tensorflow as tf

    x_var, w_var = graph_node.inputs[0], graph_node.inputs[1]
    out_var = graph_node.outputs[0]
    w = _torch_layout_weight(w_var, tf_layers_dict)
    k = len(w.shape) - 2
    attrs = graph_node.attrs
    if attrs.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        raise ConversionError(f"Conv {graph_node.name!r} uses auto_pad={attrs['auto_pad']}; torch never exports it.")
    pads = list(attrs.get("pads", [0] * (2 * k)))
    strides = list(attrs.get("strides", [1] * k))
    dilations = list(attrs.get("dilations", [1] * k))

    x = _channel_last(_tf_value(x_var, tf_layers_dict), list(x_var.shape), k)
    if any(pads):
        x = tf.pad(x, [[0, 0], *([b, e] for b, e in zip(pads[:k], pads[k:], strict=True)), [0, 0]])
    # torch (O, I/g, *k) -> TF (*k, I/g, O); TF infers the group count from input channels / kernel in-channels.
    kernel = tf.transpose(w, [*range(2, k + 2), 1, 0])
    y = _conv_nd(x, kernel, strides, dilations)
    if len(graph_node.inputs) >= 3:
        y = y + _tf_value(graph_node.inputs[2], tf_layers_dict)
    tf_layers_dict[out_var.name] = {
        "optype": "Conv",
        "shape": out_var.shape,
        "dtype": out_var.dtype,
        "nhwc": True,
        "tf_node": y,
    }


def _with_layout_flag(make_node):
    """Apply onnx2tf's ``inverted_operation_enable_disable`` decorator, which records on each output whether its TF
    shape differs from the ONNX shape (``before_op_output_shape_trans``); the next ops convert axes by that flag."""
    from onnx2tf.utils.common_functions import inverted_operation_enable_disable

    return inverted_operation_enable_disable(make_node)


def _conv_nd(x, kernel, strides: list[int], dilations: list[int]):
    """Channel-last VALID convolution. ``tf.nn.conv2d/3d`` rather than ``tf.nn.convolution``, which refuses strides
    and dilations > 1 together (the graph is never run by TF; tf2jax maps it to ``conv_general_dilated``)."""
    import tensorflow as tf

    k = len(strides)
    if k == 1:  # as a 2-D convolution over a unit height
        y = tf.nn.conv2d(
            tf.expand_dims(x, 1),
            tf.expand_dims(kernel, 0),
            [1, 1, *strides, 1],
            "VALID",
            dilations=[1, 1, *dilations, 1],
        )
        return tf.squeeze(y, 1)
    conv = {2: tf.nn.conv2d, 3: tf.nn.conv3d}.get(k)
    if conv is None:
        raise ConversionError(
            f"{k}-D convolutions with weight inputs are not supported by onnx2tf; use route='onnx-jax'."
        )
    return conv(x, kernel, [1, *strides, 1], "VALID", dilations=[1, *dilations, 1])


def _wrap_conv(original):
    replacement = _with_layout_flag(_conv_weight_input)

    def make_node(*, graph_node, tf_layers_dict, **kwargs):
        if hasattr(graph_node.inputs[1], "values"):  # constant weight: onnx2tf's own path
            return original(graph_node=graph_node, tf_layers_dict=tf_layers_dict, **kwargs)
        return replacement(graph_node=graph_node, tf_layers_dict=tf_layers_dict, **kwargs)

    return make_node


# ---------------------------------------------------------------------------------------------------------------
# 2. LayerNormalization with scale/bias graph inputs


def _layer_norm_weight_input(*, graph_node, tf_layers_dict, **kwargs) -> None:
    """onnx2tf ``make_node`` for LayerNormalization whose scale or bias is not a constant (module doc, fix 2).

    The normalised axis is converted to the TF layout exactly as onnx2tf's own op does (``convert_axis`` with the
    data input's ``before_op_output_shape_trans``); scale and bias, 1-D over that axis, are reshaped to broadcast there.
    """
    import tensorflow as tf
    from onnx2tf.utils.common_functions import convert_axis

    x_var = graph_node.inputs[0]
    out_var = graph_node.outputs[0]
    if len([o for o in graph_node.outputs if o.name]) > 1:
        raise ConversionError(f"LayerNormalization {graph_node.name!r} exports its mean/inv-std; not supported.")
    x = _tf_value(x_var, tf_layers_dict)
    rank = len(x.shape)
    onnx_axis = graph_node.attrs.get("axis", -1) % rank
    if onnx_axis != rank - 1:
        raise ConversionError(
            f"LayerNormalization {graph_node.name!r} normalises over several axes ({onnx_axis}..{rank - 1}); onnx2tf "
            'cannot map that layout. Use route="onnx-jax".'
        )
    # Only the data input's flag counts: onnx2tf's own op sees constant scale/bias (no flag, i.e. True); a kept
    # scale graph input is flagged "not transposed", which would wrongly veto the axis conversion.
    trans = tf_layers_dict.get(x_var.name, {}).get("before_op_output_shape_trans", True)
    axis = convert_axis(axis=onnx_axis, tensor_rank=rank, before_op_output_shape_trans=trans)
    eps = graph_node.attrs.get("epsilon", 1e-5)
    mean = tf.reduce_mean(x, axis=[axis], keepdims=True)
    centred = x - mean
    var = tf.reduce_mean(centred * centred, axis=[axis], keepdims=True)
    y = centred / tf.sqrt(var + tf.cast(eps, x.dtype))
    broadcast = [-1 if i == axis else 1 for i in range(rank)]
    y = y * tf.reshape(_tf_value(graph_node.inputs[1], tf_layers_dict), broadcast)
    if len(graph_node.inputs) >= 3 and graph_node.inputs[2].name:
        y = y + tf.reshape(_tf_value(graph_node.inputs[2], tf_layers_dict), broadcast)
    entry = tf_layers_dict.get(x_var.name, {})
    tf_layers_dict[out_var.name] = {
        "optype": "LayerNormalization",
        "shape": out_var.shape,
        "dtype": out_var.dtype,
        "nhwc": entry.get("nhwc", False),
        "tf_node": y,
    }


def _wrap_layer_norm(original):
    replacement = _with_layout_flag(_layer_norm_weight_input)

    def make_node(*, graph_node, tf_layers_dict, **kwargs):
        if all(hasattr(v, "values") for v in graph_node.inputs[1:] if v.name):
            return original(graph_node=graph_node, tf_layers_dict=tf_layers_dict, **kwargs)
        return replacement(graph_node=graph_node, tf_layers_dict=tf_layers_dict, **kwargs)

    return make_node


# ---------------------------------------------------------------------------------------------------------------
# 3. MatMul without the layout search


def _wrap_matmul(original):
    def make_node(*, graph_node, tf_layers_dict, **kwargs):
        # onnx2tf only searches layouts when it has onnxruntime results for this node; hide them.
        kwargs = {**kwargs, "onnx_tensor_infos_for_validation": None}
        return original(graph_node=graph_node, tf_layers_dict=tf_layers_dict, **kwargs)

    return make_node


# ---------------------------------------------------------------------------------------------------------------
# 4. Transpose of a matrix


def _transpose_matrix(*, graph_node, tf_layers_dict, **kwargs) -> None:
    """A 2-D Transpose exactly as ONNX says (onnx2tf only moves rank 3-5 tensors to channel-last, so matrices are
    always in ONNX layout)."""
    import tensorflow as tf

    x_var, out_var = graph_node.inputs[0], graph_node.outputs[0]
    perm = list(graph_node.attrs.get("perm", [1, 0]))
    tf_layers_dict[out_var.name] = {
        "optype": "Transpose",
        "shape": out_var.shape,
        "dtype": out_var.dtype,
        "nhwc": False,
        "tf_node": tf.transpose(_tf_value(x_var, tf_layers_dict), perm),
    }


def _wrap_transpose(original):
    replacement = _with_layout_flag(_transpose_matrix)

    def make_node(*, graph_node, tf_layers_dict, **kwargs):
        x_var = graph_node.inputs[0]
        if hasattr(x_var, "values") or x_var.shape is None or len(x_var.shape) != 2:
            return original(graph_node=graph_node, tf_layers_dict=tf_layers_dict, **kwargs)
        return replacement(graph_node=graph_node, tf_layers_dict=tf_layers_dict, **kwargs)

    return make_node


# ---------------------------------------------------------------------------------------------------------------
# Installing the fixes and the guards


def _no_download() -> np.ndarray:
    """Stand-in for onnx2tf's calibration-image download (made when every input is a small 3-channel NHWC-like
    tensor): deterministic local data of the same shape, used only for onnx2tf's internal shape checks."""
    return np.random.default_rng(0).random((20, 128, 128, 3), dtype=np.float32)


@contextlib.contextmanager
def _patched(obj, name: str, value) -> Iterator[None]:
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


@contextlib.contextmanager
def patched_onnx2tf() -> Iterator[str]:
    """Install fixes 1-4 and the guards for one ``onnx2tf.convert`` call; yield a private temporary directory
    (also the working directory meanwhile, since onnx2tf writes relative paths). Not thread-safe: it patches
    module attributes, the working directory and the environment, and restores all of them on exit."""
    o2t = importlib.import_module("onnx2tf.onnx2tf")
    common = importlib.import_module("onnx2tf.utils.common_functions")
    conv = importlib.import_module("onnx2tf.ops.Conv")
    matmul = importlib.import_module("onnx2tf.ops.MatMul")
    layer_norm = importlib.import_module("onnx2tf.ops.LayerNormalization")
    transpose = importlib.import_module("onnx2tf.ops.Transpose")
    saved_env = {k: os.environ.get(k) for k in ("CUDA_VISIBLE_DEVICES", "TF_CPP_MIN_LOG_LEVEL", "TF_USE_LEGACY_KERAS")}
    cwd = os.getcwd()
    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="torchntk-onnx2tf-"))
        stack.enter_context(_patched(conv, "make_node", _wrap_conv(conv.make_node)))
        stack.enter_context(_patched(matmul, "make_node", _wrap_matmul(matmul.make_node)))
        stack.enter_context(_patched(layer_norm, "make_node", _wrap_layer_norm(layer_norm.make_node)))
        stack.enter_context(_patched(transpose, "make_node", _wrap_transpose(transpose.make_node)))
        for module in (o2t, common):
            if hasattr(module, "download_test_image_data"):
                stack.enter_context(_patched(module, "download_test_image_data", _no_download))
            if hasattr(module, "check_cuda_enabled"):  # runs `nvidia-smi` through the shell and PATH
                stack.enter_context(_patched(module, "check_cuda_enabled", lambda: False))
        os.chdir(tmp)
        try:
            yield tmp
        finally:
            os.chdir(cwd)
            for key, value in saved_env.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
