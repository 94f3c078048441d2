"""Per-op tests of the onnx-jax interpreter against onnxruntime on small random onnx.helper graphs."""

from __future__ import annotations

import jax
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from torchntk.converters.onnx_jax import onnx_to_jax

RNG = np.random.default_rng(0)
F32 = TensorProto.FLOAT


def rand(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


def ints(*values: int) -> np.ndarray:
    return np.asarray(values, np.int64)


def make_model(
    op: str,
    inputs: dict,
    consts: dict | list | None = None,
    opset: int = 20,
    n_out: int = 1,
    out_type: int = F32,
    **attrs,
) -> onnx.ModelProto:
    """One ``op`` node whose inputs are graph inputs (``inputs``) and initializers (``consts``), in that order
    unless an input name is given as ``""`` (an omitted optional input)."""
    consts = list((consts or {}).items()) if not isinstance(consts, list) else consts
    names = [*inputs, *(k for k, _ in consts)]
    node = helper.make_node(op, names, [f"y{i}" for i in range(n_out)], name=f"{op}_node", **attrs)
    graph = helper.make_graph(
        [node],
        "g",
        [
            helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
            for k, v in inputs.items()
        ],
        [helper.make_tensor_value_info(f"y{i}", out_type, None) for i in range(n_out)],
        [onnx.numpy_helper.from_array(v, k) for k, v in consts if k],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def check(model: onnx.ModelProto, inputs: dict, rtol: float = 1e-5, atol: float = 1e-5) -> None:
    expected = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, inputs)
    actual = jax.jit(onnx_to_jax(model))(*inputs.values())
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected, strict=True):
        assert a.shape == e.shape, (a.shape, e.shape)
        np.testing.assert_allclose(np.asarray(a), e, rtol=rtol, atol=atol)


def op_case(op: str, inputs: dict, consts: dict | None = None, opset: int = 20, **attrs) -> None:
    # An omitted optional input is written as a key starting with "_" whose value is None.
    consts = [("" if k.startswith("_") else k, v) for k, v in (consts or {}).items()]
    check(make_model(op, inputs, consts, opset, **attrs), inputs)


UNARY = ["Abs", "Neg", "Exp", "Tanh", "Sigmoid", "Erf", "Floor", "Ceil", "Sign", "Sin", "Cos", "Atan", "Relu"]
UNARY += ["Softplus", "Softsign", "Elu", "Selu", "Celu", "Mish", "HardSigmoid", "HardSwish", "Gelu", "Round"]


@pytest.mark.parametrize("op", UNARY)
def test_unary(op: str) -> None:
    op_case(op, {"x": rand(2, 3, 4) * 3})


@pytest.mark.parametrize("op", ["Sqrt", "Log", "Reciprocal"])
def test_unary_positive(op: str) -> None:
    op_case(op, {"x": np.abs(rand(3, 4)) + 0.5})


@pytest.mark.parametrize(
    ("op", "attrs"),
    [
        ("LeakyRelu", {"alpha": 0.2}),
        ("HardSigmoid", {"alpha": 0.3, "beta": 0.4}),
        ("Elu", {"alpha": 0.7}),
        ("ThresholdedRelu", {"alpha": 0.5}),
        ("Gelu", {"approximate": "tanh"}),
        ("Celu", {"alpha": 2.0}),
    ],
)
def test_activation_attributes(op: str, attrs: dict) -> None:
    op_case(op, {"x": rand(4, 5) * 3}, **attrs)


@pytest.mark.parametrize("op", ["Add", "Sub", "Mul", "Div", "Max", "Min", "Sum", "Mean"])
@pytest.mark.parametrize(("sa", "sb"), [((2, 3, 4), (2, 3, 4)), ((2, 3, 4), (4,)), ((2, 1, 4), (3, 1)), ((), (3,))])
def test_binary_broadcasting(op: str, sa: tuple, sb: tuple) -> None:
    op_case(op, {"a": rand(*sa), "b": rand(*sb) + (3.0 if op == "Div" else 0.0)})


@pytest.mark.parametrize("op", ["Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual"])
def test_comparisons(op: str) -> None:
    a = np.round(rand(3, 4))
    check(make_model(op, {"a": a, "b": np.round(rand(4))}, out_type=TensorProto.BOOL), {"a": a, "b": np.round(rand(4))})


def test_where_and_pow_prelu() -> None:
    op_case("Where", {"c": rand(3, 4) > 0, "a": rand(3, 4), "b": rand(4)})
    op_case("Pow", {"x": rand(3, 4)}, {"p": np.asarray(3.0, np.float32)})
    op_case("Pow", {"x": np.abs(rand(3, 4)) + 0.1}, {"p": np.asarray(0.7, np.float32)})
    op_case("PRelu", {"x": rand(2, 3, 4, 4)}, {"s": rand(3, 1, 1)})


def test_integer_div_mod_truncate_like_onnx() -> None:
    a, b = ints(7, -7, 7, -7), ints(2, 2, -2, -2)
    check(make_model("Div", {"a": a, "b": b}, out_type=TensorProto.INT64), {"a": a, "b": b})
    check(make_model("Mod", {"a": a, "b": b}, out_type=TensorProto.INT64), {"a": a, "b": b})


@pytest.mark.parametrize("opset", [6, 13])
def test_clip_min_max_as_attribute_or_input(opset: int) -> None:
    x = rand(3, 5) * 4
    if opset < 11:
        op_case("Clip", {"x": x}, opset=opset, min=-1.0, max=2.0)
    else:
        op_case("Clip", {"x": x}, {"lo": np.float32(-1.0), "hi": np.float32(2.0)}, opset=opset)
        op_case("Clip", {"x": x}, {"_": None, "hi": np.float32(0.5)}, opset=opset)


@pytest.mark.parametrize("to", [TensorProto.INT32, TensorProto.DOUBLE, TensorProto.FLOAT16])
def test_cast(to: int) -> None:
    x = rand(3, 4) * 5
    expected = ort.InferenceSession(
        make_model("Cast", {"x": x}, to=to, out_type=to).SerializeToString(), providers=["CPUExecutionProvider"]
    ).run(None, {"x": x})[0]
    with jax.enable_x64(True):
        actual = onnx_to_jax(make_model("Cast", {"x": x}, to=to, out_type=to))(x)[0]
        assert actual.dtype == expected.dtype
    np.testing.assert_allclose(np.asarray(actual), expected, rtol=1e-3)
    op_case("CastLike", {"x": x}, {"t": np.zeros(1, np.float32)})


# ---------------------------------------------------------------- convolutions


CONV_CASES = [
    ({}, (1, 3, 7, 7), (4, 3, 3, 3)),
    ({"pads": [1, 2, 0, 1], "strides": [2, 1]}, (2, 3, 8, 7), (5, 3, 3, 2)),
    ({"dilations": [2, 2], "pads": [2, 2, 2, 2]}, (1, 2, 9, 9), (3, 2, 3, 3)),
    ({"auto_pad": "SAME_UPPER", "strides": [2, 2]}, (1, 3, 8, 7), (4, 3, 4, 4)),
    ({"auto_pad": "SAME_LOWER", "strides": [2, 3]}, (1, 3, 8, 7), (4, 3, 4, 3)),
    ({"auto_pad": "VALID", "strides": [2, 2]}, (1, 3, 9, 9), (4, 3, 3, 3)),
    ({"group": 3, "pads": [1, 1, 1, 1]}, (1, 6, 6, 6), (9, 2, 3, 3)),
    ({"group": 4, "pads": [1, 1, 1, 1], "strides": [2, 2]}, (1, 4, 8, 8), (4, 1, 3, 3)),  # depthwise
    ({"strides": [2], "pads": [1, 1]}, (2, 3, 10), (4, 3, 3)),  # 1-D
    ({"pads": [1, 0, 1, 1, 0, 1]}, (1, 2, 4, 5, 5), (3, 2, 3, 2, 3)),  # 3-D
]


@pytest.mark.parametrize(("attrs", "xs", "ws"), CONV_CASES)
def test_conv(attrs: dict, xs: tuple, ws: tuple) -> None:
    op_case("Conv", {"x": rand(*xs), "w": rand(*ws), "b": rand(ws[0])}, **attrs)


def test_conv_without_bias_and_weights_as_initializers() -> None:
    op_case("Conv", {"x": rand(1, 3, 6, 6)}, {"w": rand(2, 3, 3, 3)}, kernel_shape=[3, 3])


@pytest.mark.parametrize(
    ("attrs", "xs", "ws"),
    [
        ({}, (1, 3, 5, 5), (3, 4, 3, 3)),
        ({"strides": [2, 2], "pads": [1, 1, 1, 1], "output_padding": [1, 1]}, (1, 2, 4, 5), (2, 3, 3, 3)),
        ({"strides": [2, 1], "dilations": [1, 2], "group": 2}, (1, 4, 4, 4), (4, 3, 3, 2)),
    ],
)
def test_conv_transpose(attrs: dict, xs: tuple, ws: tuple) -> None:
    op_case("ConvTranspose", {"x": rand(*xs), "w": rand(*ws), "b": rand(ws[1] * attrs.get("group", 1))}, **attrs)


# ---------------------------------------------------------------- pooling

POOL_CASES = [
    {"kernel_shape": [3, 3], "strides": [2, 2]},
    {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]},
    {"kernel_shape": [3, 3], "strides": [2, 2], "ceil_mode": 1},
    {"kernel_shape": [2, 3], "strides": [2, 2], "pads": [1, 0, 1, 1], "ceil_mode": 1},
    {"kernel_shape": [3, 3], "strides": [2, 2], "auto_pad": "SAME_UPPER"},
    {"kernel_shape": [2, 3], "strides": [2, 2], "auto_pad": "SAME_LOWER"},
    {"kernel_shape": [3, 3], "auto_pad": "VALID"},
]


@pytest.mark.parametrize("attrs", POOL_CASES)
def test_max_pool(attrs: dict) -> None:
    op_case("MaxPool", {"x": rand(2, 3, 8, 9)}, **attrs)


def test_max_pool_dilated() -> None:
    op_case("MaxPool", {"x": rand(1, 2, 9, 9)}, kernel_shape=[2, 2], dilations=[2, 2], pads=[1, 1, 1, 1])


@pytest.mark.parametrize("count_include_pad", [0, 1])
@pytest.mark.parametrize("attrs", POOL_CASES)
def test_average_pool(attrs: dict, count_include_pad: int) -> None:
    op_case("AveragePool", {"x": rand(2, 3, 8, 9)}, count_include_pad=count_include_pad, **attrs)


def test_global_pools_and_reduce_mean() -> None:
    op_case("GlobalAveragePool", {"x": rand(2, 3, 5, 4)})
    op_case("GlobalMaxPool", {"x": rand(2, 3, 5, 4)})


# ---------------------------------------------------------------- normalization, matrix products, softmax


def test_batch_norm_inference() -> None:
    c = 4
    op_case(
        "BatchNormalization",
        {"x": rand(2, c, 3, 3), "s": rand(c), "b": rand(c)},
        {"m": rand(c), "v": np.abs(rand(c)) + 0.1},
        epsilon=1e-3,
    )


@pytest.mark.parametrize("axis", [-1, -2, 1])
def test_layer_norm(axis: int) -> None:
    shape = (2, 3, 4)
    norm_shape = shape[axis:] if axis < 0 else shape[axis:]
    op_case(
        "LayerNormalization",
        {"x": rand(*shape), "s": rand(*norm_shape), "b": rand(*norm_shape)},
        axis=axis,
        epsilon=1e-5,
    )
    op_case("LayerNormalization", {"x": rand(*shape), "s": rand(*norm_shape)}, axis=axis)


def test_instance_and_group_norm() -> None:
    op_case("InstanceNormalization", {"x": rand(2, 3, 4, 5), "s": rand(3), "b": rand(3)})
    op_case("GroupNormalization", {"x": rand(2, 6, 4, 5), "s": rand(6), "b": rand(6)}, opset=21, num_groups=3)


@pytest.mark.parametrize(
    "attrs", [{}, {"transA": 1}, {"transB": 1}, {"transA": 1, "transB": 1, "alpha": 0.5, "beta": 2.0}]
)
def test_gemm(attrs: dict) -> None:
    a = rand(3, 4) if not attrs.get("transA") else rand(4, 3)
    b = rand(4, 5) if not attrs.get("transB") else rand(5, 4)
    op_case("Gemm", {"a": a, "b": b, "c": rand(5)}, **attrs)
    op_case("Gemm", {"a": a, "b": b}, **attrs)


@pytest.mark.parametrize(
    ("sa", "sb"), [((3, 4), (4, 5)), ((2, 3, 4), (4, 5)), ((2, 1, 3, 4), (5, 4, 2)), ((4,), (4, 3))]
)
def test_matmul(sa: tuple, sb: tuple) -> None:
    op_case("MatMul", {"a": rand(*sa), "b": rand(*sb)})


@pytest.mark.parametrize("equation", ["ij,jk->ik", "bij,bjk->bik", "...ij,...jk", "i,i", "ij->ji"])
def test_einsum(equation: str) -> None:
    shapes = {
        "ij,jk->ik": [(3, 4), (4, 5)],
        "bij,bjk->bik": [(2, 3, 4), (2, 4, 5)],
        "...ij,...jk": [(2, 3, 4), (2, 4, 2)],
        "i,i": [(4,), (4,)],
        "ij->ji": [(3, 4)],
    }[equation]
    op_case("Einsum", {f"x{i}": rand(*s) for i, s in enumerate(shapes)}, equation=equation)


@pytest.mark.parametrize(
    ("op", "opset", "axis"),
    [("Softmax", 13, -1), ("Softmax", 13, 1), ("Softmax", 11, 1), ("LogSoftmax", 13, 0), ("LogSoftmax", 11, 2)],
)
def test_softmax(op: str, opset: int, axis: int) -> None:
    op_case(op, {"x": rand(2, 3, 4) * 3}, opset=opset, axis=axis)


# ---------------------------------------------------------------- reductions


@pytest.mark.parametrize(
    "op",
    [
        "ReduceSum",
        "ReduceMean",
        "ReduceMax",
        "ReduceMin",
        "ReduceProd",
        "ReduceL2",
        "ReduceSumSquare",
        "ReduceL1",
        "ReduceLogSumExp",
    ],
)
@pytest.mark.parametrize("keepdims", [0, 1])
def test_reductions_axes_input_and_attribute(op: str, keepdims: int) -> None:
    x = rand(2, 3, 4)
    op_case(op, {"x": x}, {"axes": ints(0, -1)}, opset=18, keepdims=keepdims)
    op_case(op, {"x": x}, opset=12, axes=[1], keepdims=keepdims)
    op_case(op, {"x": x}, opset=18, keepdims=keepdims)  # no axes: reduce everything


def test_reduce_sum_noop_with_empty_axes_and_argmax() -> None:
    op_case("ReduceSum", {"x": rand(2, 3)}, opset=13, noop_with_empty_axes=1)
    x = np.round(rand(3, 4))
    check(make_model("ArgMax", {"x": x}, out_type=TensorProto.INT64, axis=1, keepdims=0), {"x": x})
    check(make_model("ArgMin", {"x": x}, out_type=TensorProto.INT64, axis=0, select_last_index=1), {"x": x})


@pytest.mark.parametrize("size", [3, 5])  # onnxruntime only takes odd sizes
def test_local_response_norm(size: int) -> None:
    op_case("LRN", {"x": rand(1, 5, 3, 3)}, size=size, alpha=0.1, beta=0.75, bias=1.5)
