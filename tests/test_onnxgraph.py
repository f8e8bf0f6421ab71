"""Batch normalisation folded into the convolutions of an exported graph: the same outputs,
fewer nodes, and nothing folded that another node or an output still reads."""

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
onnxruntime = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from covidxray.model.onnxgraph import fold_batch_norms  # noqa: E402

CHANNELS = 6


def _graph(tmp_path, transpose=False, expose_sub=False, scalar_mul=False, depthwise=False,
           bias=True, shape=None, size=8):
    """x -> Conv -> [Transpose to channels-last] -> Sub(mean) -> Mul(scale) -> Add(beta) ->
    Clip(0, 6), as Keras exports a convolution, its batch normalisation and ReLU6
    (``depthwise``: one filter per input channel; ``shape``: of the three constants)."""
    rng = np.random.default_rng(0)
    shape = shape or ((1, 1, 1, CHANNELS) if transpose else (1, CHANNELS, 1, 1))
    inputs = CHANNELS if depthwise else 3
    constants = {
        "w": rng.normal(size=(CHANNELS, 1 if depthwise else 3, 3, 3)).astype(np.float32),
        "b": rng.normal(size=CHANNELS).astype(np.float32),
        "mean": rng.normal(size=shape).astype(np.float32),
        "scale": (np.float32(1.7) if scalar_mul else
                  rng.uniform(0.5, 2, size=shape).astype(np.float32)),
        "beta": rng.normal(size=shape).astype(np.float32),
        "low": np.float32(0), "high": np.float32(6)}
    nodes = [helper.make_node("Conv", ["x", "w", "b"] if bias else ["x", "w"], ["conv"],
                              pads=[1, 1, 1, 1], group=CHANNELS if depthwise else 1)]
    if not bias:
        del constants["b"]
    after = "conv"
    if transpose:
        nodes.append(helper.make_node("Transpose", ["conv"], ["nhwc"], perm=[0, 2, 3, 1]))
        after = "nhwc"
    nodes += [helper.make_node("Sub", [after, "mean"], ["centred"]),
              helper.make_node("Mul", ["centred", "scale"], ["scaled"]),
              helper.make_node("Add", ["scaled", "beta"], ["normalised"]),
              helper.make_node("Clip", ["normalised", "low", "high"], ["y"])]
    out_shape = [None, size, size, CHANNELS] if transpose else [None, CHANNELS, size, size]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)]
    if expose_sub:
        outputs.append(helper.make_tensor_value_info("centred", TensorProto.FLOAT, out_shape))
    graph = helper.make_graph(
        nodes, "bn", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                    [None, inputs, size, size])],
        outputs, [numpy_helper.from_array(np.asarray(v), k) for k, v in constants.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path / "model.onnx"
    onnx.save(model, str(path))
    return path


def _run(path, x):
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})


@pytest.mark.parametrize("options", [{}, {"transpose": True}, {"depthwise": True},
                                     {"bias": False}, {"shape": (CHANNELS, 1, 1)}])
def test_folded_graph_gives_the_same_outputs(tmp_path, options):
    path = _graph(tmp_path, **options)
    channels = CHANNELS if options.get("depthwise") else 3
    x = np.random.default_rng(1).normal(size=(2, channels, 8, 8)).astype(np.float32)
    before = _run(path, x)
    assert fold_batch_norms(path) == 1
    np.testing.assert_allclose(_run(path, x)[0], before[0], atol=1e-5)
    ops = [node.op_type for node in onnx.load(str(path)).graph.node]
    assert not {"Sub", "Mul", "Add"} & set(ops), ops


def test_nothing_folded_that_is_read_elsewhere_or_not_per_channel(tmp_path):
    """An intermediate the graph gives out, one factor for every channel, and constants of
    as many values as channels that run along the width (CHANNELS wide here), not the
    channels: left as they are."""
    for options in ({"expose_sub": True}, {"scalar_mul": True},
                    {"shape": (CHANNELS,), "size": CHANNELS},
                    {"shape": (1, CHANNELS, 1), "size": CHANNELS},
                    {"transpose": True, "shape": (CHANNELS, 1, 1), "size": CHANNELS}):
        path = _graph(tmp_path, **options)
        size = options.get("size", 8)
        x = np.random.default_rng(1).normal(size=(1, 3, size, size)).astype(np.float32)
        before = _run(path, x)
        assert fold_batch_norms(path) == 0, options
        for got, want in zip(_run(path, x), before):
            np.testing.assert_allclose(got, want, atol=1e-6)
