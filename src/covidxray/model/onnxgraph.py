"""An exported network made fast on a CPU: batch normalisation folded into the convolutions.

Keras' ONNX export writes each inference-mode batch normalisation as arithmetic on constants
(``(x - mean) * scale + beta``: Sub, Mul, Add) after its Conv. onnxruntime's own fusions of a
Conv with a following Mul or Add do not match that chain (it starts with Sub, and a Transpose
may sit between), so every convolution leaves onnxruntime's blocked (NCHWc) layout and comes
back, and no activation is fused into its convolution: on EfficientNet-Lite0 that doubles the
time of a forward pass. Folding the three into the Conv's weights and bias (``W * scale``,
``(b - mean) * scale + beta``) gives the same outputs within float rounding (each export is
checked against its Keras model) at half the cost.

Needs the ``onnx`` package (installed with the exporters); run at export time only."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np

NCHW_TO_NHWC = [0, 2, 3, 1]


def fold_batch_norms(path: Path) -> int:
    """Rewrite the ONNX file at ``path`` in place with every Conv -> Sub -> Mul -> Add of
    per-channel constants (a Transpose to channels-last may sit after the Conv) folded into
    the Conv; returns how many were folded. onnxruntime's basic, hardware-independent
    optimisations (constant folding, transposes pushed through) run first, so that the
    pattern is found whatever layout the exporter wrote."""
    import onnx
    import onnxruntime
    from onnx import numpy_helper
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_BASIC
    optimised = Path(path).with_name(Path(path).name + ".basic")
    options.optimized_model_filepath = str(optimised)
    try:
        onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        model = onnx.load(str(optimised))
    finally:
        optimised.unlink(missing_ok=True)
    graph = model.graph
    constants = {tensor.name: tensor for tensor in graph.initializer}
    consumers = defaultdict(list)
    for node in graph.node:
        for name in _reads(node):
            consumers[name].append(node)
    outputs = {output.name for output in graph.output}

    def sole_consumer(name: str):
        found = consumers[name]
        return found[0] if len(found) == 1 and name not in outputs else None

    def per_channel(node, channels: int, channels_last: bool) -> np.ndarray | None:
        """The constant second operand of ``node`` if it holds one value per channel and
        broadcasts along the channels (else None: (C,) on NCHW runs along the width)."""
        if len(node.input) != 2 or node.input[1] not in constants:
            return None
        value = numpy_helper.to_array(constants[node.input[1]])
        wanted = (channels,) if channels_last else (channels, 1, 1)
        shape = value.shape[-len(wanted):] if value.ndim >= len(wanted) else None
        if shape != wanted or any(size != 1 for size in value.shape[:-len(wanted)]):
            return None
        return value.astype(np.float64).reshape(channels)

    dropped, folded = set(), 0
    for conv in list(graph.node):
        bias_given = len(conv.input) > 2 and conv.input[2]
        if conv.op_type != "Conv" or conv.input[1] not in constants or (
                bias_given and conv.input[2] not in constants):
            continue
        stored = numpy_helper.to_array(constants[conv.input[1]])
        weights, channels = stored.astype(np.float64), stored.shape[0]
        following = sole_consumer(conv.output[0])
        transpose = None
        if following is not None and following.op_type == "Transpose":
            perm = next((list(a.ints) for a in following.attribute if a.name == "perm"), None)
            if perm != NCHW_TO_NHWC:
                continue
            transpose, following = following, sole_consumer(following.output[0])
        steps = []
        for op_type in ("Sub", "Mul", "Add"):
            value = None if following is None or following.op_type != op_type else \
                per_channel(following, channels, transpose is not None)
            if value is None:
                break
            steps.append((following, value))
            following = sole_consumer(following.output[0])
        if len(steps) != 3:
            continue
        (sub, mean), (mul, scale), (add, beta) = steps
        bias = numpy_helper.to_array(constants[conv.input[2]]).astype(np.float64) \
            if bias_given else np.zeros(channels)
        names = (f"{conv.output[0]}_folded_weights", f"{conv.output[0]}_folded_bias")
        per_output = scale.reshape(-1, *[1] * (weights.ndim - 1))
        graph.initializer.extend([
            numpy_helper.from_array((weights * per_output).astype(stored.dtype), names[0]),
            numpy_helper.from_array(((bias - mean) * scale + beta).astype(stored.dtype),
                                    names[1])])
        del conv.input[1:]
        conv.input.extend(names)
        (transpose or conv).output[0] = add.output[0]  # the rest of the graph reads it there
        dropped.update(id(node) for node in (sub, mul, add))
        folded += 1
    kept = [node for node in graph.node if id(node) not in dropped]
    del graph.node[:]
    graph.node.extend(kept)
    used = {name for node in graph.node for name in _reads(node)}
    kept_constants = [tensor for tensor in graph.initializer if tensor.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept_constants)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return folded


def _reads(node):
    """The names ``node`` reads: its inputs, and those of the nodes of its subgraphs (the
    branches of an If, the body of a Loop), which may read the outer graph's."""
    yield from node.input
    for attribute in node.attribute:
        for subgraph in [attribute.g] * attribute.HasField("g") + list(attribute.graphs):
            for inner in subgraph.node:
                yield from _reads(inner)
