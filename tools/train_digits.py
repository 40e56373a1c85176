#!/usr/bin/env python3
"""Train Shoal's bundled "digits" models and export them as hand-built ONNX.

Shoal needs small, real, license-clean models whose outputs are known ahead of
time so its serving paths (versioning, canary/shadow traffic, batching,
timeouts) can be tested end to end.  This script makes them from
scikit-learn's bundled 8x8 digits data set (``load_digits``; no download, the
data ships inside the scikit-learn wheel) and writes:

  models/digits-v1.onnx      MLP 64-16-10, briefly trained: the weaker "old"
                             version.
  models/digits-v2.onnx      MLP 64-64-10, fully trained: the better "new"
                             version.  It disagrees with v1 on a few held-out
                             samples on purpose, so shadow/canary tests can
                             measure a non-trivial agreement rate.
  models/digits-slow.onnx    v2 plus a deliberately expensive side branch
                             (see ``slow_branch``) so that timeout, queueing
                             and concurrency tests have a model that takes
                             several milliseconds per request, while its
                             predictions are those of v2.
  models/digits-samples.json every held-out sample (raw pixels), its true
                             label, each model's held-out accuracy as measured
                             with onnxruntime on the exported files, and the
                             v1/v2 agreement rate.  Tests use it as ground
                             truth.

Every model has the same interface, chosen to be easy to serve and to test:

  input  "input"          float32 [batch, 64]  raw pixels 0..16, exactly as
                                               sklearn returns them (the 1/16
                                               scaling used in training is a
                                               Mul inside the graph, so
                                               clients need no preprocessing)
  output "probabilities"  float32 [batch, 10]  Softmax(axis=1) of the logits
  output "label"          int64   [batch]      ArgMax(axis=1, keepdims=0) of
                                               the logits

Design choices:

* Graphs are built by hand with ``onnx.helper`` from the learned ``coefs_`` /
  ``intercepts_`` (Mul, Gemm, Relu, Tanh, MatMul, Add, Softmax, ArgMax only)
  rather than with skl2onnx: no extra dependency, no ML-domain operators, and
  every runtime (including the Rust one Shoal uses) supports these ops.
* opset 13 and IR version 8, so that older runtimes load the files.
* Reproducible: fixed split and seeds, single-threaded BLAS (thread count can
  change floating-point summation order, hence the trained weights),
  ``producer_name`` "shoal-tools", no timestamps.  Re-running with the pinned
  versions in tools/requirements.txt rewrites byte-identical files.
* Accuracies are measured with onnxruntime on the files just written, not
  with sklearn, so the numbers describe what is actually served.

Usage: python3 tools/train_digits.py [--out-dir models] [--skip-timing]
"""

from __future__ import annotations

import os

# Pin BLAS/OpenMP to one thread *before* numpy is imported: multi-threaded
# reductions may sum in a different order and change the trained weights in
# the last bits, which would break byte-for-byte reproducibility.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.exceptions import ConvergenceWarning  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402
from sklearn.neural_network import MLPClassifier  # noqa: E402

OPSET = 13
IR_VERSION = 8
PRODUCER = "shoal-tools"
PRODUCER_VERSION = "1"

SPLIT_SEED = 0
TEST_FRACTION = 0.25
PIXEL_MAX = 16.0  # digits pixels are integers 0..16

# (hidden units, seed, max_iter, alpha).  v1 stops after 100 epochs, before
# convergence, so it is measurably weaker than v2.
V1_PARAMS = dict(hidden=16, seed=1, max_iter=100, alpha=1e-4)
V2_PARAMS = dict(hidden=64, seed=3, max_iter=500, alpha=1e-3)

# Slow branch: one shared WIDTH x WIDTH matrix applied DEPTH times.  Sized so
# a single-sample inference takes ~10 ms with onnxruntime on one thread of
# this project's 2-core machines while the file stays ~2.7 MB.
SLOW_WIDTH = 768
SLOW_DEPTH = 420
SLOW_GAIN = 1.5  # >1 keeps tanh activations O(1) (no decay to denormals)
SLOW_SCALE = 1e-6  # weight of the branch in the logits: tiny but non-zero
SLOW_SEED = 1234
SLOW_MIN_MS = 5.0  # the script fails if the slow model is faster than this


# --------------------------------------------------------------------------
# Data and training
# --------------------------------------------------------------------------


def load_split():
    """Fixed, stratified 75/25 split of the 1797 digits samples."""
    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=TEST_FRACTION, random_state=SPLIT_SEED, stratify=y
    )
    return x_train, x_test, y_train, y_test


def train_mlp(x_train, y_train, hidden, seed, max_iter, alpha) -> MLPClassifier:
    """One-hidden-layer ReLU MLP trained on pixels scaled to [0, 1]."""
    clf = MLPClassifier(
        hidden_layer_sizes=(hidden,),
        activation="relu",
        solver="adam",
        alpha=alpha,
        max_iter=max_iter,
        random_state=seed,
    )
    with warnings.catch_warnings():
        # v1 is stopped early on purpose; the warning is expected noise.
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(x_train / PIXEL_MAX, y_train)
    return clf


# --------------------------------------------------------------------------
# ONNX construction
# --------------------------------------------------------------------------


def f32(name: str, array) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(array, dtype=np.float32), name)


def mlp_nodes(clf: MLPClassifier, prefix: str):
    """Nodes + initializers computing logits ``{prefix}logits`` from "input".

    The pixel scaling is baked in as ``Mul(input, 1/16)``; the two dense
    layers are ``Gemm`` with sklearn's (in, out)-shaped weight matrices.
    """
    (w1, w2), (b1, b2) = clf.coefs_, clf.intercepts_
    inits = [
        f32(f"{prefix}pixel_scale", 1.0 / PIXEL_MAX),
        f32(f"{prefix}w1", w1),
        f32(f"{prefix}b1", b1),
        f32(f"{prefix}w2", w2),
        f32(f"{prefix}b2", b2),
    ]
    nodes = [
        helper.make_node("Mul", ["input", f"{prefix}pixel_scale"], ["x_scaled"], name="scale"),
        helper.make_node("Gemm", ["x_scaled", f"{prefix}w1", f"{prefix}b1"], ["h1"], name="fc1"),
        helper.make_node("Relu", ["h1"], ["h1_relu"], name="relu1"),
        helper.make_node(
            "Gemm", ["h1_relu", f"{prefix}w2", f"{prefix}b2"], ["logits"], name="fc2"
        ),
    ]
    return nodes, inits


def slow_branch(seed: int = SLOW_SEED):
    """A costly side branch from "x_scaled" to a [batch, 10] tensor ~1e-6.

    x_scaled -> Gemm(64 -> WIDTH) -> Tanh -> DEPTH x [MatMul(Q) -> Tanh]
             -> Gemm(WIDTH -> 10, weights pre-multiplied by SLOW_SCALE)

    Q is a single shared initializer (a scaled random orthogonal matrix), so
    the cost grows with DEPTH but the file size does not.  tanh bounds every
    activation in [-1, 1], so the final projection is at most ~SLOW_SCALE in
    magnitude: far below the gap between the top two logits, hence the argmax
    (and the probabilities, to float32 precision) match v2.  The branch
    depends on the input and its output feeds the logits, so no optimizer
    can constant-fold or prune it away.
    """
    rng = np.random.default_rng(seed)
    w_in = rng.standard_normal((64, SLOW_WIDTH)) / np.sqrt(64.0)
    q, r = np.linalg.qr(rng.standard_normal((SLOW_WIDTH, SLOW_WIDTH)))
    q = q * np.sign(np.diag(r))  # make the QR factorization unique
    w_out = rng.standard_normal((SLOW_WIDTH, 10)) / np.sqrt(SLOW_WIDTH)

    inits = [
        f32("slow_w_in", w_in),
        f32("slow_q", SLOW_GAIN * q),
        f32("slow_w_out", SLOW_SCALE * w_out),
    ]
    nodes = [
        helper.make_node("Gemm", ["x_scaled", "slow_w_in"], ["slow_0_pre"], name="slow_in"),
        helper.make_node("Tanh", ["slow_0_pre"], ["slow_0"], name="slow_in_tanh"),
    ]
    for i in range(1, SLOW_DEPTH + 1):
        nodes += [
            helper.make_node(
                "MatMul", [f"slow_{i - 1}", "slow_q"], [f"slow_{i}_pre"], name=f"slow_mm_{i}"
            ),
            helper.make_node("Tanh", [f"slow_{i}_pre"], [f"slow_{i}"], name=f"slow_tanh_{i}"),
        ]
    nodes.append(
        helper.make_node(
            "Gemm", [f"slow_{SLOW_DEPTH}", "slow_w_out"], ["slow_delta"], name="slow_out"
        )
    )
    return nodes, inits


def head_nodes(logits: str):
    """Softmax probabilities and ArgMax label from the logits."""
    return [
        helper.make_node("Softmax", [logits], ["probabilities"], name="softmax", axis=1),
        helper.make_node("ArgMax", [logits], ["label"], name="argmax", axis=1, keepdims=0),
    ]


def make_model(name: str, doc: str, nodes, inits) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        name,
        inputs=[helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 64])],
        outputs=[
            helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 10]),
            helper.make_tensor_value_info("label", TensorProto.INT64, ["batch"]),
        ],
        initializer=inits,
        doc_string=doc,
    )
    model = helper.make_model(
        graph,
        producer_name=PRODUCER,
        producer_version=PRODUCER_VERSION,
        opset_imports=[helper.make_opsetid("", OPSET)],
        doc_string=doc,
    )
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model, full_check=True)
    return model


def build_mlp_model(name: str, clf: MLPClassifier, doc: str) -> onnx.ModelProto:
    nodes, inits = mlp_nodes(clf, prefix="")
    return make_model(name, doc, nodes + head_nodes("logits"), inits)


def build_slow_model(name: str, clf: MLPClassifier, doc: str) -> onnx.ModelProto:
    nodes, inits = mlp_nodes(clf, prefix="")
    slow_nodes, slow_inits = slow_branch()
    nodes += slow_nodes
    nodes.append(
        helper.make_node("Add", ["logits", "slow_delta"], ["logits_total"], name="add_slow")
    )
    return make_model(name, doc, nodes + head_nodes("logits_total"), inits + slow_inits)


# --------------------------------------------------------------------------
# Evaluation with onnxruntime
# --------------------------------------------------------------------------


def ort_session(path: Path) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def run(sess: ort.InferenceSession, x: np.ndarray):
    probs, labels = sess.run(["probabilities", "label"], {"input": x.astype(np.float32)})
    return probs, labels


def p50_latency_ms(sess: ort.InferenceSession, x1: np.ndarray, runs: int = 200) -> float:
    """Median wall time of single-sample inference, after warm-up."""
    feed = {"input": x1.astype(np.float32)}
    for _ in range(10):
        sess.run(None, feed)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        sess.run(None, feed)
        times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1e3)


# --------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------


def write_samples(path: Path, x_test, y_test, accuracy: dict, agreement: float) -> None:
    """JSON with one sample per line (diff-friendly); floats as plain numbers."""
    rows = ",\n    ".join(json.dumps([float(v) for v in row]) for row in x_test)
    text = (
        "{\n"
        f'  "inputs": [\n    {rows}\n  ],\n'
        f'  "labels": {json.dumps([int(v) for v in y_test])},\n'
        f'  "accuracy": {json.dumps(accuracy)},\n'
        f'  "agreement_v1_v2": {json.dumps(agreement)}\n'
        "}\n"
    )
    parsed = json.loads(text)  # guard against formatting mistakes
    assert len(parsed["inputs"]) == len(parsed["labels"]) == len(x_test)
    path.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_out = Path(__file__).resolve().parent.parent / "models"
    parser.add_argument("--out-dir", type=Path, default=default_out)
    parser.add_argument("--skip-timing", action="store_true", help="skip latency measurement")
    args = parser.parse_args()
    out: Path = args.out_dir
    out.mkdir(parents=True, exist_ok=True)

    x_train, x_test, y_train, y_test = load_split()
    print(f"digits: {len(x_train)} train / {len(x_test)} held-out samples")

    v1 = train_mlp(x_train, y_train, **V1_PARAMS)
    v2 = train_mlp(x_train, y_train, **V2_PARAMS)

    models = {
        "digits-v1": build_mlp_model(
            "digits_v1",
            v1,
            "Shoal test model: MLP 64-16-10 (ReLU) on sklearn digits; "
            "input raw pixels 0..16. Made by tools/train_digits.py.",
        ),
        "digits-v2": build_mlp_model(
            "digits_v2",
            v2,
            "Shoal test model: MLP 64-64-10 (ReLU) on sklearn digits; "
            "input raw pixels 0..16. Made by tools/train_digits.py.",
        ),
        "digits-slow": build_slow_model(
            "digits_slow",
            v2,
            "Shoal test model: digits-v2 plus a deliberately slow side branch "
            f"({SLOW_DEPTH} x MatMul {SLOW_WIDTH}x{SLOW_WIDTH} + Tanh, added to the "
            f"logits at scale {SLOW_SCALE:g}); predictions equal digits-v2. "
            "Made by tools/train_digits.py.",
        ),
    }

    paths = {}
    for name, model in models.items():
        paths[name] = out / f"{name}.onnx"
        onnx.save_model(model, str(paths[name]))

    sessions = {name: ort_session(path) for name, path in paths.items()}
    results = {name: run(sess, x_test) for name, sess in sessions.items()}
    labels = {name: r[1] for name, r in results.items()}

    accuracy = {name: float(np.mean(labels[name] == y_test)) for name in models}
    agreement = float(np.mean(labels["digits-v1"] == labels["digits-v2"]))

    # Sanity checks on what was exported.
    for name in models:
        sk = (v1 if name == "digits-v1" else v2).predict(x_test / PIXEL_MAX)
        mismatches = int(np.sum(sk != labels[name]))
        assert mismatches == 0, f"{name}: ONNX disagrees with sklearn on {mismatches} samples"
        probs = results[name][0]
        assert np.allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert np.array_equal(labels["digits-slow"], labels["digits-v2"]), "slow != v2"
    max_prob_diff = float(np.max(np.abs(results["digits-slow"][0] - results["digits-v2"][0])))
    assert accuracy["digits-v2"] > accuracy["digits-v1"], "v2 must beat v1"
    assert agreement < 1.0, "v1 and v2 must disagree on some samples"
    # Batched and single-sample inference must agree.
    for i in range(0, len(x_test), 97):
        for name, sess in sessions.items():
            assert run(sess, x_test[i : i + 1])[1][0] == labels[name][i]

    write_samples(out / "digits-samples.json", x_test, y_test, accuracy, agreement)

    for name in models:
        size = paths[name].stat().st_size
        print(f"{name:12s} accuracy {accuracy[name]:.4f}  ({size:,} bytes)")
    print(f"agreement v1/v2: {agreement:.4f}")
    print(f"digits-slow vs digits-v2: same labels, max |prob diff| {max_prob_diff:.2e}")

    if not args.skip_timing:
        for name, sess in sessions.items():
            ms = p50_latency_ms(sess, x_test[:1], runs=100 if name == "digits-slow" else 500)
            print(f"{name:12s} p50 single-sample latency (ORT, 1 thread): {ms:.3f} ms")
            if name == "digits-slow" and ms < SLOW_MIN_MS:
                raise SystemExit(f"digits-slow is too fast ({ms:.2f} ms < {SLOW_MIN_MS} ms)")


if __name__ == "__main__":
    main()
