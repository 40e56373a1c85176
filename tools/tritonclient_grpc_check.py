#!/usr/bin/env python3
"""Checks a Shoal server's gRPC service with Triton's own gRPC client, unchanged.

Drives the official `tritonclient[grpc]` package against a replica's
`--grpc-addr`, and `tritonclient[http]` against its REST address with the
same requests: both protocols must give the same answers, exactly. Checks
liveness, readiness, server and model metadata, inference (the client sends
inputs as raw_input_contents), the outputs asked for, a request id, and the
gRPC status codes of errors. Exits non-zero, with the reason, on the first
mismatch; prints a JSON summary otherwise.

With CA_PEM both clients speak TLS (gRPC `ssl=True` with the CA as root
certificates, https for REST) and verify the server's certificate by it.

Usage: tritonclient_grpc_check.py GRPC_HOST:PORT HTTP_HOST:PORT MODEL SAMPLES_JSON MIN_ACCURACY [CA_PEM]
"""

import json
import sys

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException


def fail(msg):
    print(f"tritonclient.grpc check failed: {msg}", file=sys.stderr)
    sys.exit(1)


def expect_error(call, status, says):
    try:
        call()
    except InferenceServerException as e:
        if e.status() != status:
            fail(f"expected {status}, got {e.status()}: {e.message()}")
        if says not in (e.message() or ""):
            fail(f"the {status} error should say {says!r}: {e.message()}")
        return e
    fail(f"expected {status} ({says}), but the call succeeded")


def main():
    grpc_url, http_url, model = sys.argv[1], sys.argv[2], sys.argv[3]
    samples_path, min_accuracy = sys.argv[4], float(sys.argv[5])
    ca = sys.argv[6] if len(sys.argv) > 6 else None
    if ca:
        client = grpcclient.InferenceServerClient(url=grpc_url, ssl=True, root_certificates=ca)
        rest = httpclient.InferenceServerClient(url=http_url, ssl=True, ssl_options={"ca_certs": ca})
    else:
        client = grpcclient.InferenceServerClient(url=grpc_url)
        rest = httpclient.InferenceServerClient(url=http_url)

    if not client.is_server_live():
        fail("server is not live")
    if not client.is_server_ready():
        fail("server is not ready")
    meta = client.get_server_metadata(as_json=True)
    if meta.get("name") != "shoal":
        fail(f"unexpected server metadata {meta}")
    if not client.is_model_ready(model):
        fail(f"model {model} is not ready")
    if client.is_model_ready("no-such-model"):
        fail("an unknown model is ready")
    grpc_meta = client.get_model_metadata(model, as_json=True)
    rest_meta = rest.get_model_metadata(model)
    for key in ("name", "platform", "versions"):
        if grpc_meta.get(key) != rest_meta.get(key):
            fail(f"model metadata {key}: gRPC {grpc_meta.get(key)} vs REST {rest_meta.get(key)}")
    for kind in ("inputs", "outputs"):
        g = [(t["name"], t["datatype"], [int(d) for d in t["shape"]]) for t in grpc_meta[kind]]
        r = [(t["name"], t["datatype"], t["shape"]) for t in rest_meta[kind]]
        if g != r:
            fail(f"model metadata {kind}: gRPC {g} vs REST {r}")

    samples = json.load(open(samples_path))
    x = np.asarray(samples["inputs"], dtype=np.float32)
    labels = np.asarray(samples["labels"], dtype=np.int64)

    g_in = grpcclient.InferInput("input", list(x.shape), "FP32")
    g_in.set_data_from_numpy(x)
    g = client.infer(model, [g_in], request_id="grpc-1")
    r_in = httpclient.InferInput("input", list(x.shape), "FP32")
    r_in.set_data_from_numpy(x)
    r = rest.infer(model, [r_in])
    for name in ("label", "probabilities"):
        a, b = g.as_numpy(name), r.as_numpy(name)
        if a is None or b is None or a.dtype != b.dtype or a.shape != b.shape:
            fail(f"output {name}: gRPC {None if a is None else (a.dtype, a.shape)} vs REST {None if b is None else (b.dtype, b.shape)}")
        if not np.array_equal(a, b):
            fail(f"output {name} differs between gRPC and REST")
    response = g.get_response(as_json=True)
    if response.get("id") != "grpc-1":
        fail(f"request id not echoed: {response.get('id')!r}")
    accuracy = float((g.as_numpy("label") == labels).mean())
    if accuracy < min_accuracy:
        fail(f"accuracy {accuracy} below {min_accuracy}")

    # Only the outputs asked for.
    only = client.infer(model, [g_in], outputs=[grpcclient.InferRequestedOutput("label")])
    if only.as_numpy("probabilities") is not None or only.as_numpy("label") is None:
        fail("asked for label only, got other outputs")

    # Errors carry the codes gRPC clients expect, and say what is wrong.
    expect_error(lambda: client.infer("no-such-model", [g_in]), "StatusCode.NOT_FOUND", "no-such-model")
    bad = grpcclient.InferInput("input", [2, 63], "FP32")
    bad.set_data_from_numpy(np.zeros((2, 63), dtype=np.float32))
    expect_error(lambda: client.infer(model, [bad]), "StatusCode.INVALID_ARGUMENT", "63")
    wrong_type = grpcclient.InferInput("input", [2, 64], "FP64")
    wrong_type.set_data_from_numpy(np.zeros((2, 64), dtype=np.float64))
    expect_error(lambda: client.infer(model, [wrong_type]), "StatusCode.INVALID_ARGUMENT", "FP64")
    expect_error(
        lambda: client.infer(model, [g_in], outputs=[grpcclient.InferRequestedOutput("nope")]),
        "StatusCode.INVALID_ARGUMENT",
        "unknown output",
    )
    # The server still answers after the errors.
    again = client.infer(model, [g_in])
    if not np.array_equal(again.as_numpy("label"), g.as_numpy("label")):
        fail("answers changed after bad requests")
    print(json.dumps({"accuracy": accuracy, "rows": int(x.shape[0]), "platform": grpc_meta["platform"]}))


if __name__ == "__main__":
    main()
