#!/usr/bin/env python3
"""Checks a Shoal server with Triton's own HTTP client, unchanged.

Shoal speaks the Open Inference Protocol v2 so that clients written for
Triton and KServe work against it as they are. This script drives the
official `tritonclient[http]` package against a running replica or gateway
and exits non-zero, with the reason, on the first mismatch. It infers
with JSON tensors (binary_data=False) and with the client's defaults,
which send inputs and ask for outputs as binary tensor data.

Usage: tritonclient_check.py HOST:PORT MODEL SAMPLES_JSON MIN_ACCURACY [CA_PEM]

With CA_PEM the client speaks https (`ssl=True`) and verifies the server's
certificate against that CA, as a user of a TLS-terminating gateway would.
"""

import json
import sys

import numpy as np
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException


def fail(msg):
    print(f"tritonclient check failed: {msg}", file=sys.stderr)
    sys.exit(1)


def main():
    url, model, samples_path, min_accuracy = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
    ca = sys.argv[5] if len(sys.argv) > 5 else None
    if ca:
        client = httpclient.InferenceServerClient(
            url=url, ssl=True, ssl_options={"ca_certs": ca}
        )
    else:
        client = httpclient.InferenceServerClient(url=url)
    if not client.is_server_live():
        fail("server is not live")
    if not client.is_server_ready():
        fail("server is not ready")
    meta = client.get_server_metadata()
    if meta.get("name") != "shoal":
        fail(f"unexpected server metadata {meta}")
    if not client.is_model_ready(model):
        fail(f"model {model} is not ready")
    model_meta = client.get_model_metadata(model)
    inputs_meta = model_meta["inputs"]
    if inputs_meta[0]["shape"] != [-1, 64] or inputs_meta[0]["datatype"] != "FP32":
        fail(f"unexpected model metadata {model_meta}")

    samples = json.load(open(samples_path))
    x = np.asarray(samples["inputs"], dtype=np.float32)
    labels = np.asarray(samples["labels"], dtype=np.int64)

    inp = httpclient.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=False)
    outputs = [
        httpclient.InferRequestedOutput("label", binary_data=False),
        httpclient.InferRequestedOutput("probabilities", binary_data=False),
    ]
    result = client.infer(model, inputs=[inp], outputs=outputs, request_id="triton-check-1")
    predicted = result.as_numpy("label")
    probs = result.as_numpy("probabilities")
    if predicted is None or probs is None:
        fail("outputs missing from the response")
    if probs.shape != (len(x), 10) or probs.dtype != np.float32:
        fail(f"probabilities have shape {probs.shape} dtype {probs.dtype}")
    if predicted.dtype != np.int64:
        fail(f"labels have dtype {predicted.dtype}")
    if result.get_response().get("id") != "triton-check-1":
        fail("request id not echoed")
    accuracy = float((predicted == labels).mean())
    if accuracy < min_accuracy:
        fail(f"accuracy {accuracy:.4f} below {min_accuracy:.4f}")

    # The client's defaults: inputs as binary data, outputs asked for as
    # binary data; all outputs (binary, as the client asks when none are
    # named); binary inputs with one output as JSON.
    binp = httpclient.InferInput("input", list(x.shape), "FP32")
    binp.set_data_from_numpy(x)
    binary = client.infer(
        model,
        inputs=[binp],
        outputs=[httpclient.InferRequestedOutput("label"), httpclient.InferRequestedOutput("probabilities")],
        request_id="triton-check-2",
    )
    if not np.array_equal(binary.as_numpy("label"), predicted):
        fail("binary inference disagrees with JSON inference")
    if not np.allclose(binary.as_numpy("probabilities"), probs, atol=1e-6):
        fail("binary probabilities differ from JSON ones")
    if binary.get_output("label").get("parameters", {}).get("binary_data_size") != 8 * len(x):
        fail(f"label output was not returned as binary: {binary.get_output('label')}")
    # No outputs named: the client asks for all of them as binary data.
    everything = client.infer(model, inputs=[binp])
    if not np.array_equal(everything.as_numpy("label"), predicted):
        fail("binary inference of all outputs disagrees with JSON inference")
    if "binary_data_size" not in everything.get_output("probabilities").get("parameters", {}):
        fail("outputs were not returned as binary when the client asked for all of them so")
    # Binary inputs, one output asked for as JSON.
    mixed = client.infer(
        model, inputs=[binp], outputs=[httpclient.InferRequestedOutput("label", binary_data=False)]
    )
    if not np.array_equal(mixed.as_numpy("label"), predicted):
        fail("binary inputs with JSON outputs disagree with JSON inference")
    if "data" not in mixed.get_output("label") or mixed.get_output("probabilities") is not None:
        fail(f"asked for label as JSON only, got {mixed.get_response()}")
    if "binary_tensor_data" not in meta.get("extensions", []):
        fail(f"server metadata does not list binary_tensor_data: {meta}")

    # Versioned inference and a wrong shape, as Triton users would send them.
    one = httpclient.InferInput("input", [1, 64], "FP32")
    one.set_data_from_numpy(x[:1], binary_data=False)
    versioned = client.infer(model, inputs=[one], model_version=model_meta["versions"][0])
    if versioned.as_numpy("label") is None:
        fail("versioned inference returned no label")
    bad = httpclient.InferInput("input", [1, 32], "FP32")
    bad.set_data_from_numpy(np.zeros((1, 32), dtype=np.float32), binary_data=False)
    try:
        client.infer(model, inputs=[bad])
        fail("a wrongly-shaped input was accepted")
    except InferenceServerException as e:
        if "must be 64, not 32" not in str(e):
            fail(f"unclear error for a wrong shape: {e}")
    print(f"tritonclient check passed: accuracy {accuracy:.4f} on {len(x)} samples")


if __name__ == "__main__":
    main()
