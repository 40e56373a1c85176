#!/usr/bin/env python3
"""Describe and time the ONNX models bundled in models/.

Shoal's runtime must accept exactly the interfaces these files declare, so
this prints, for each model, what a server has to know to serve it:

* inputs and outputs: name, element type and shape, with symbolic dimensions
  shown by name ("?" when a dimension is unnamed and unknown);
* the IR version, the opsets imported and the producer;
* every distinct operator type, including those inside subgraphs (If/Loop/
  Scan bodies), and whether any control-flow or signal-processing op
  (If, Loop, Scan, STFT, ...) is present, since those are the ones most
  likely to be unsupported by an alternative runtime;
* the median (p50) latency of one inference with onnxruntime restricted to a
  single thread, as a reference point for Shoal's own runtime.

Inputs used for timing: one row of digits pixels for the digits models, a
[1, 3, 48, 192] image for the text-orientation classifier (its usual input
size), and one 576-sample frame plus zero LSTM state for Silero VAD.
Random inputs come from a fixed seed so the run is repeatable.

Usage: python3 tools/inspect_models.py [--models-dir models] [--runs 200]
"""

from __future__ import annotations

import argparse
import collections
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

CONTROL_FLOW_OPS = {"If", "Loop", "Scan", "SequenceMap", "STFT", "DFT"}

ELEM_TYPES = {
    onnx.TensorProto.FLOAT: np.float32,
    onnx.TensorProto.INT64: np.int64,
    onnx.TensorProto.INT32: np.int32,
}


def dim_str(dim) -> str:
    if dim.HasField("dim_param"):
        return dim.dim_param
    if dim.HasField("dim_value"):
        return str(dim.dim_value)
    return "?"


def value_info_str(vi) -> str:
    tt = vi.type.tensor_type
    dtype = onnx.TensorProto.DataType.Name(tt.elem_type)
    return f"{vi.name}: {dtype} [{', '.join(dim_str(d) for d in tt.shape.dim)}]"


def count_ops(graph, counter: collections.Counter) -> None:
    """Count node op types, descending into subgraph attributes."""
    for node in graph.node:
        domain = node.domain or "ai.onnx"
        counter[node.op_type if domain == "ai.onnx" else f"{domain}:{node.op_type}"] += 1
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                count_ops(attr.g, counter)
            for sub in attr.graphs:
                count_ops(sub, counter)


def timing_feed(path: Path, sess: ort.InferenceSession, rng) -> dict:
    """A representative single-inference input for each bundled model."""
    name = path.name
    if name.startswith("digits-"):
        return {"input": rng.integers(0, 17, size=(1, 64)).astype(np.float32)}
    if name.startswith("ch_ppocr_mobile_v2.0_cls"):
        return {sess.get_inputs()[0].name: rng.standard_normal((1, 3, 48, 192)).astype(np.float32)}
    if name.startswith("silero_vad_16k_sequence"):
        return {
            "input": (0.1 * rng.standard_normal((1, 576))).astype(np.float32),
            "h": np.zeros((1, 1, 128), np.float32),
            "c": np.zeros((1, 1, 128), np.float32),
        }
    raise ValueError(f"no timing input known for {name}")


def p50_ms(sess: ort.InferenceSession, feed: dict, runs: int) -> float:
    for _ in range(min(10, runs)):
        sess.run(None, feed)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        sess.run(None, feed)
        times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1e3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_dir = Path(__file__).resolve().parent.parent / "models"
    parser.add_argument("--models-dir", type=Path, default=default_dir)
    parser.add_argument("--runs", type=int, default=200)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1

    for path in sorted(args.models_dir.glob("*.onnx")):
        model = onnx.load(str(path))
        onnx.checker.check_model(model)
        inits = {i.name for i in model.graph.initializer}
        ops = collections.Counter()
        count_ops(model.graph, ops)
        opsets = ", ".join(f"{o.domain or 'ai.onnx'} {o.version}" for o in model.opset_import)

        print(f"== {path.name} ({path.stat().st_size:,} bytes)")
        print(f"   producer: {model.producer_name} {model.producer_version}".rstrip())
        print(f"   ir_version {model.ir_version}; opsets: {opsets}")
        for vi in model.graph.input:
            if vi.name not in inits:
                print(f"   input  {value_info_str(vi)}")
        for vi in model.graph.output:
            print(f"   output {value_info_str(vi)}")
        print(f"   ops ({sum(ops.values())} nodes): "
              + ", ".join(f"{k} x{v}" for k, v in sorted(ops.items())))
        flagged = sorted(CONTROL_FLOW_OPS & set(ops))
        print(f"   control-flow / STFT ops: {', '.join(flagged) if flagged else 'none'}")

        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        feed = timing_feed(path, sess, rng)
        shapes = ", ".join(f"{k} {list(v.shape)}" for k, v in feed.items())
        print(f"   ORT 1-thread p50: {p50_ms(sess, feed, args.runs):.3f} ms  ({shapes})")


if __name__ == "__main__":
    main()
