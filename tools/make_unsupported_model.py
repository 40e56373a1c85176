#!/usr/bin/env python3
"""Writes a valid ONNX model that tract cannot run, for fail-safe tests.

The model has the digits classifier's interface (input `input` [batch, 64]
float32, output `probabilities` [batch, 10]) but computes a determinant
(`Det`, ONNX opset 11) on the way: a standard operator that ONNX Runtime
runs and tract does not implement. It passes `onnx.checker`, so only an
engine check (or a replica trying to load it) can tell it will not serve.

Usage: make_unsupported_model.py OUT
"""

import sys

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def main():
    out = sys.argv[1]
    weights = numpy_helper.from_array(
        np.full((1, 10), 0.1, dtype=np.float32), name="weights"
    )
    shape = numpy_helper.from_array(np.array([-1, 8, 8], dtype=np.int64), name="shape")
    column = numpy_helper.from_array(np.array([-1, 1], dtype=np.int64), name="column")
    nodes = [
        helper.make_node("Reshape", ["input", "shape"], ["squares"]),
        helper.make_node("Det", ["squares"], ["det"]),
        helper.make_node("Reshape", ["det", "column"], ["det_column"]),
        helper.make_node("MatMul", ["det_column", "weights"], ["probabilities"]),
    ]
    graph = helper.make_graph(
        nodes,
        "unsupported",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 10])],
        initializer=[weights, shape, column],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="shoal-tests"
    )
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, out)


if __name__ == "__main__":
    main()
