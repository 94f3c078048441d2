"""Shape and indexing ops of the onnx-jax interpreter against onnxruntime, plus static shape sub-graphs."""

from __future__ import annotations

import jax
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from test_onnx_jax_ops import check, ints, make_model, op_case, rand

from torchntk.converters.onnx_jax import UnsupportedOnnxOp, onnx_to_jax


def primitives(fn, *args) -> set[str]:  # noqa: ANN001
    return {eqn.primitive.name for eqn in jax.make_jaxpr(fn)(*args).jaxpr.eqns}


def test_reshape_zero_minus_one_and_allowzero() -> None:
    x = rand(2, 3, 4)
    op_case("Reshape", {"x": x}, {"s": ints(0, -1)})
    op_case("Reshape", {"x": x}, {"s": ints(4, 0, 2)}, allowzero=0)
    op_case("Reshape", {"x": x}, {"s": ints(-1, 2, 2)}, allowzero=1)


@pytest.mark.parametrize("axis", [0, 1, 2, -1])
def test_flatten(axis: int) -> None:
    op_case("Flatten", {"x": rand(2, 3, 4)}, axis=axis)


def test_transpose() -> None:
    op_case("Transpose", {"x": rand(2, 3, 4)}, perm=[1, 2, 0])
    op_case("Transpose", {"x": rand(2, 3, 4)})


@pytest.mark.parametrize("opset", [11, 13])
def test_squeeze_unsqueeze_axes_attribute_or_input(opset: int) -> None:
    x = rand(1, 3, 1, 4)
    if opset < 13:
        op_case("Squeeze", {"x": x}, opset=opset, axes=[0, -2])
        op_case("Unsqueeze", {"x": rand(3, 4)}, opset=opset, axes=[0, -1])
    else:
        op_case("Squeeze", {"x": x}, {"a": ints(0, -2)}, opset=opset)
        op_case("Unsqueeze", {"x": rand(3, 4)}, {"a": ints(0, 3)}, opset=opset)
    op_case("Squeeze", {"x": x}, opset=opset)


def test_concat() -> None:
    op_case("Concat", {"a": rand(2, 3), "b": rand(2, 1)}, {"c": rand(2, 2)}, axis=-1)


@pytest.mark.parametrize("opset", [11, 13, 18])
def test_split(opset: int) -> None:
    x = rand(7, 3)
    if opset < 13:
        check(make_model("Split", {"x": x}, opset=opset, n_out=3, split=[2, 4, 1]), {"x": x})
    else:
        check(make_model("Split", {"x": x}, {"s": ints(2, 4, 1)}, opset=opset, n_out=3), {"x": x})
    if opset < 18:  # no sizes: equal parts, one per output
        check(make_model("Split", {"x": rand(6, 3)}, opset=opset, n_out=3), {"x": rand(6, 3)})
    else:  # uneven num_outputs: the last chunk is smaller
        check(make_model("Split", {"x": x}, opset=opset, n_out=3, num_outputs=3), {"x": x})


@pytest.mark.parametrize(
    ("starts", "ends", "axes", "steps"),
    [
        ((1,), (3,), (0,), (1,)),
        ((0, -1), (100, -10), (1, 2), (2, -1)),  # clamping and a negative step
        ((-1,), (-1000,), (-1,), (-2,)),
        ((2, 1), (1, 4), (0, 1), (1, 1)),  # an empty slice
    ],
)
def test_slice(starts: tuple, ends: tuple, axes: tuple, steps: tuple) -> None:
    op_case("Slice", {"x": rand(4, 5, 6)}, {"s": ints(*starts), "e": ints(*ends), "a": ints(*axes), "t": ints(*steps)})


def test_slice_opset9_attributes_and_default_axes() -> None:
    op_case("Slice", {"x": rand(4, 5)}, opset=9, starts=[1, 0], ends=[3, -1])
    op_case("Slice", {"x": rand(4, 5)}, {"s": ints(1, 0), "e": ints(3, -1)})


@pytest.mark.parametrize(
    ("indices", "axis"),
    [
        (np.asarray(1, np.int64), 0),
        (ints(-1), 1),
        (ints(0, 2, 4, 1), 2),
        (np.asarray([[0, 1], [1, 2], [2, 3]], np.int64), 1),
        (ints(3, 3, 3), 2),
        (ints(3, 2, 1, 0), 2),
        (np.asarray([5, 0, 3, 1, 4, 2, 5, 0, 3, 1, 4, 2, 5, 0, 3, 1, 4, 2, 0, 5, 1, 3, 2, 4]), 2),  # irregular
    ],
)
def test_gather_static_indices_on_data(indices: np.ndarray, axis: int) -> None:
    op_case("Gather", {"x": rand(3, 4, 6)}, {"i": indices.astype(np.int64)}, axis=axis)


def test_gather_with_regular_static_indices_uses_slices_not_gather() -> None:
    model = make_model("Gather", {"x": rand(3, 4, 6)}, {"i": np.asarray([[0, 1], [1, 2], [2, 3]], np.int64)}, axis=1)
    assert "gather" not in primitives(onnx_to_jax(model), rand(3, 4, 6))


def test_gather_traced_indices() -> None:
    op_case("Gather", {"x": rand(3, 4), "i": ints(2, -1, 0)}, axis=0)


def test_gather_nd_and_elements() -> None:
    op_case("GatherND", {"x": rand(3, 4, 5)}, {"i": np.asarray([[[0, 1]], [[2, 3]]], np.int64)})
    op_case("GatherND", {"x": rand(3, 4, 5), "i": np.asarray([[1], [2]], np.int64)})
    op_case("GatherElements", {"x": rand(3, 4), "i": np.asarray([[0, 2], [1, 3], [3, 0]], np.int64)}, axis=1)


def test_gather_nd_adaptive_pool_pattern_is_a_broadcast() -> None:
    # vgg/alexnet export adaptive_avg_pool2d(1x1 → 6x6) as GatherND with every index (0, 0).
    indices = np.zeros((6, 1, 6, 1, 2), np.int64)
    model = make_model("GatherND", {"x": rand(1, 1, 2, 3)}, {"i": indices})
    op_case("GatherND", {"x": rand(1, 1, 2, 3)}, {"i": indices})
    assert "gather" not in primitives(onnx_to_jax(model), rand(1, 1, 2, 3))


def test_expand_tile() -> None:
    op_case("Expand", {"x": rand(3, 1)}, {"s": ints(2, 1, 4)})
    op_case("Expand", {"x": rand(1, 1, 4)}, {"s": ints(1, 1, 1)})
    op_case("Tile", {"x": rand(2, 3)}, {"r": ints(2, 3)})


@pytest.mark.parametrize("mode", ["constant", "reflect", "edge", "wrap"])
def test_pad_modes(mode: str) -> None:
    x = rand(2, 3, 4, 5)
    op_case("Pad", {"x": x}, {"p": ints(0, 0, 1, 2, 0, 0, 2, 1)}, mode=mode)
    op_case("Pad", {"x": x}, {"p": ints(1, -1, 2, 0), "_": None, "a": ints(2, 3)}, mode=mode)


def test_pad_constant_value_and_opset2_attributes() -> None:
    op_case("Pad", {"x": rand(2, 3)}, {"p": ints(1, 0, 0, 2), "v": np.asarray(1.5, np.float32)})
    op_case("Pad", {"x": rand(2, 3)}, opset=2, pads=[1, 0, 0, 2], value=-2.0)


def test_depth_space_trilu_cumsum() -> None:
    op_case("DepthToSpace", {"x": rand(1, 8, 2, 3)}, blocksize=2, mode="DCR")
    op_case("DepthToSpace", {"x": rand(1, 8, 2, 3)}, blocksize=2, mode="CRD")
    op_case("SpaceToDepth", {"x": rand(1, 2, 4, 6)}, blocksize=2)
    op_case("Trilu", {"x": rand(2, 4, 5)}, {"k": np.asarray(1, np.int64)}, upper=0)
    op_case("Trilu", {"x": rand(4, 5)})
    op_case("CumSum", {"x": rand(3, 4)}, {"a": np.asarray(1, np.int64)}, exclusive=1, reverse=1)


@pytest.mark.parametrize(
    "attrs",
    [
        {"mode": "nearest", "coordinate_transformation_mode": "asymmetric", "nearest_mode": "floor"},
        {"mode": "nearest"},
        {"mode": "linear"},
        {"mode": "linear", "coordinate_transformation_mode": "align_corners"},
        {"mode": "linear", "coordinate_transformation_mode": "pytorch_half_pixel"},
        {"mode": "linear", "coordinate_transformation_mode": "asymmetric"},
    ],
)
@pytest.mark.parametrize("scales", [(1.0, 1.0, 2.0, 2.0), (1.0, 1.0, 1.5, 0.5)])
def test_resize_scales(attrs: dict, scales: tuple) -> None:
    op_case("Resize", {"x": rand(1, 2, 4, 6)}, {"_": None, "s": np.asarray(scales, np.float32)}, **attrs)


def test_resize_sizes_and_nearest_upsampling_is_a_broadcast() -> None:
    op_case("Resize", {"x": rand(1, 2, 4, 6)}, {"_r": None, "_s": None, "z": ints(1, 2, 7, 3)}, mode="linear")
    model = make_model(
        "Resize",
        {"x": rand(1, 2, 4, 6)},
        [("", None), ("s", np.asarray((1, 1, 2, 3), np.float32))],
        coordinate_transformation_mode="asymmetric",
        nearest_mode="floor",
    )
    assert "gather" not in primitives(onnx_to_jax(model), rand(1, 2, 4, 6))


def _shape_subgraph_model() -> onnx.ModelProto:
    """y = Reshape(x, [Shape(x)[0], -1]) + ConstantOfShape(...) via Range/Cast: shape arithmetic only."""
    nodes = [
        helper.make_node("Shape", ["x"], ["shape"]),
        helper.make_node("Gather", ["shape", "zero"], ["batch"], axis=0),
        helper.make_node("Unsqueeze", ["batch", "zero1"], ["batch1"]),
        helper.make_node("Concat", ["batch1", "minus1"], ["target"], axis=0),
        helper.make_node("Reshape", ["x", "target"], ["flat"]),
        helper.make_node("Shape", ["flat"], ["flat_shape"], start=1),
        helper.make_node("ConstantOfShape", ["flat_shape"], ["ones"], value=helper.make_tensor("v", 1, [1], [1.0])),
        helper.make_node("Range", ["r0", "r1", "r2"], ["steps"]),
        helper.make_node("Cast", ["steps"], ["steps_f"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["ones", "steps_f"], ["scaled"]),
        helper.make_node("Add", ["flat", "scaled"], ["y"]),
    ]
    consts = {
        "zero": np.asarray(0, np.int64),
        "zero1": ints(0),
        "minus1": ints(-1),
        "r0": np.asarray(0, np.int64),
        "r1": np.asarray(12, np.int64),
        "r2": np.asarray(1, np.int64),
    }
    graph = helper.make_graph(
        nodes,
        "shapes",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [onnx.numpy_helper.from_array(v, k) for k, v in consts.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_shape_subgraph_stays_static_under_jit_and_vmap() -> None:
    model, x = _shape_subgraph_model(), rand(2, 3, 4)
    check(model, {"x": x})
    g = onnx_to_jax(model)
    assert primitives(lambda v: g(v)[0], x) <= {"reshape", "add", "broadcast_in_dim"}
    batched = jax.vmap(lambda v: g(v)[0])(np.stack([x, 2 * x]))
    np.testing.assert_allclose(batched[1], g(2 * x)[0], rtol=1e-6)


@pytest.mark.parametrize("opset", [7, 9])
def test_upsample_old_opsets(opset: int) -> None:
    x, scales = rand(1, 2, 3, 4), [1.0, 1.0, 2.0, 3.0]
    if opset < 9:
        op_case("Upsample", {"x": x}, opset=opset, scales=scales)
    else:
        op_case("Upsample", {"x": x}, {"s": np.asarray(scales, np.float32)}, opset=opset)


def scatter_nd_model(data: np.ndarray | None, indices: np.ndarray, updates: np.ndarray, **attrs) -> onnx.ModelProto:
    """ScatterND(data, indices, updates) with constant indices; ``data=None`` makes it a constant of zeros."""
    inputs = {"u": updates} if data is None else {"d": data, "u": updates}
    consts = [onnx.numpy_helper.from_array(indices, "i")]
    if data is None:
        consts.append(onnx.numpy_helper.from_array(np.zeros((3, 4), np.float32), "d"))
    node = helper.make_node("ScatterND", ["d", "i", "u"], ["y0"], **attrs)
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info(k, TensorProto.FLOAT, v.shape) for k, v in inputs.items()],
        [helper.make_tensor_value_info("y0", TensorProto.FLOAT, None)],
        consts,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


@pytest.mark.parametrize("reduction", ["none", "add"])
def test_scatter_nd_static_indices_is_a_take_not_a_scatter(reduction: str) -> None:
    data, updates = rand(4, 3, 5), rand(2, 2, 5)
    repeated = [3, 2] if reduction == "add" else [2, 2]  # repeated indices add up; with "none" ONNX leaves them open
    indices = np.asarray([[[0, 1], [3, 2]], [[1, 0], repeated]], np.int64)
    model = scatter_nd_model(data, indices, updates, reduction=reduction)
    check(model, {"d": data, "u": updates})
    assert not any("scatter" in p for p in primitives(onnx_to_jax(model), data, updates))


def test_scatter_nd_static_data_negative_indices_and_unsupported_reduction() -> None:
    # swin's shifted-window mask: constant data with whole rows overwritten (here the updates are traced).
    updates = rand(2, 4)
    check(scatter_nd_model(None, np.asarray([[-1], [0]], np.int64), updates), {"u": updates})
    bad = scatter_nd_model(None, np.asarray([[1]], np.int64), rand(1, 4), reduction="mul")
    with pytest.raises(UnsupportedOnnxOp, match="reduction='mul'"):
        onnx_to_jax(bad)(rand(1, 4))


@pytest.mark.parametrize("reduction", ["none", "add"])
def test_scatter_nd_indices_from_the_inputs(reduction: str) -> None:
    """Indices computed from the graph inputs (a model's token ids): the source row of every position computed by
    an integer scatter, then a take (``none``) or a 0/1 matrix (``add``); only the integer scatter is one."""
    data, updates = rand(4, 3, 5), rand(2, 2, 5)
    repeated = [3, 2] if reduction == "add" else [2, 1]
    indices = np.asarray([[[0, 1], [3, 2]], [[-3, 0], repeated]], np.int64)
    node = helper.make_node("ScatterND", ["d", "i", "u"], ["y0"], reduction=reduction)
    graph = helper.make_graph(
        [node],
        "g",
        [
            helper.make_tensor_value_info("d", TensorProto.FLOAT, data.shape),
            helper.make_tensor_value_info("i", TensorProto.INT64, indices.shape),
            helper.make_tensor_value_info("u", TensorProto.FLOAT, updates.shape),
        ],
        [helper.make_tensor_value_info("y0", TensorProto.FLOAT, None)],
    )
    check(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), {"d": data, "i": indices, "u": updates}
    )


def elements_model(op: str, floats: dict[str, np.ndarray], indices: np.ndarray, traced: bool, **attrs) -> tuple:
    """``op(d, i[, u])`` (GatherElements, ScatterElements) with ``indices`` a graph input (``traced``) or a constant:
    ``(model, feeds)``."""
    names = ["d", "i", *(["u"] if "u" in floats else [])]
    inputs = [helper.make_tensor_value_info(k, TensorProto.FLOAT, v.shape) for k, v in floats.items()]
    constants = [] if traced else [onnx.numpy_helper.from_array(indices, "i")]
    if traced:
        inputs.append(helper.make_tensor_value_info("i", TensorProto.INT64, indices.shape))
    node = helper.make_node(op, names, ["y0"], **attrs)
    output = helper.make_tensor_value_info("y0", TensorProto.FLOAT, None)
    graph = helper.make_graph([node], "g", inputs, [output], initializer=constants)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), {
        **floats,
        **({"i": indices} if traced else {}),
    }


@pytest.mark.parametrize("traced", [False, True], ids=["static", "traced"])
@pytest.mark.parametrize("reduction", ["none", "add"])
def test_scatter_elements_along_an_axis(reduction: str, traced: bool) -> None:
    """ScatterElements (torch.scatter / scatter_add) as the ScatterND writing the same elements: negative axis and
    indices, repeated indices adding up (``add``), indices a graph input or a constant."""
    data, updates = rand(2, 3, 4), rand(2, 3, 2)
    second = [1, 0] if reduction == "none" else [1, 1]
    indices = np.asarray([[[0, -1], [2, 3], [-4, 1]], [[3, 2], second, [0, 2]]], np.int64)
    check(*elements_model("ScatterElements", {"d": data, "u": updates}, indices, traced, axis=-1, reduction=reduction))


def test_scatter_elements_unsupported_reduction() -> None:
    model, _ = elements_model(
        "ScatterElements", {"d": rand(3), "u": rand(1)}, np.asarray([1], np.int64), False, axis=0, reduction="max"
    )
    with pytest.raises(UnsupportedOnnxOp, match="reduction='max'"):
        onnx_to_jax(model)(rand(3), rand(1))


def test_gather_elements_with_an_index_smaller_on_other_axes() -> None:
    """torch.gather allows index.size(d) <= input.size(d) on the other axes (found by hostile probing: a raw
    "Incompatible shapes for broadcasting"); ONNX's output has the indices' shape."""
    data = rand(2, 5, 4)
    indices = np.asarray(np.random.default_rng(0).integers(-4, 4, size=(2, 3, 2)), np.int64)
    for traced in (False, True):
        check(*elements_model("GatherElements", {"d": data}, indices, traced, axis=2))
