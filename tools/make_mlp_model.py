#!/usr/bin/env python3
"""Writes a synthetic MLP as ONNX, for artifact benchmarks.

`layers` MatMul+Tanh layers of `width`x`width` float32 weights (each layer
is width*width*4 bytes: 1 MiB at width 512), seeded so the same arguments
always give the same file. With --perturb-layer K the weights of layer K
(only) are changed: a new version that "changes one tensor", for measuring
delta updates. Input `input` [batch, width], output `output` [batch, width].

Usage: make_mlp_model.py OUT --layers 100 [--width 512] [--seed 0] [--perturb-layer K]
"""

import argparse

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def main():
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--layers", type=int, default=100)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--perturb-layer", type=int, default=None)
    a = p.parse_args()
    rng = np.random.default_rng(a.seed)
    scale = 1.0 / np.sqrt(a.width)
    nodes, inits = [], []
    prev = "input"
    for i in range(a.layers):
        w = (rng.standard_normal((a.width, a.width)) * scale).astype(np.float32)
        if i == a.perturb_layer:
            w = w + np.float32(0.01)
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        nodes.append(helper.make_node("MatMul", [prev, f"w{i}"], [f"m{i}"]))
        out = "output" if i == a.layers - 1 else f"h{i}"
        nodes.append(helper.make_node("Tanh", [f"m{i}"], [out]))
        prev = out
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", a.width])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", a.width])],
        inits,
    )
    model = helper.make_model(graph, producer_name="shoal-tools", opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, a.out)


if __name__ == "__main__":
    main()
