#!/usr/bin/env python3
"""Streams a sequence through a Shoal server with Triton's own HTTP client.

Each frame of FRAMES_JSON (a list of lists of floats, 576 samples each) is
one step of sequence SEQUENCE_ID of MODEL (Silero VAD's sequence model,
state kept by Shoal): `client.infer(..., sequence_id=..., sequence_start=...,
sequence_end=...)` exactly as a Triton user calls it, JSON tensors for the
first half and the client's default binary tensors for the rest. The
speech probability of every step must equal EXPECTED_JSON's within 1e-5;
exits non-zero, with the reason, on the first mismatch.

Usage: tritonclient_sequence.py HOST:PORT MODEL FRAMES_JSON EXPECTED_JSON SEQUENCE_ID
"""

import json
import sys

import numpy as np
import tritonclient.http as httpclient


def fail(msg):
    print(f"tritonclient sequence check failed: {msg}", file=sys.stderr)
    sys.exit(1)


def main():
    url, model, frames_path, expected_path, sequence_id = sys.argv[1:6]
    sequence_id = int(sequence_id) if sequence_id.isdigit() else sequence_id
    frames = json.load(open(frames_path))
    expected = json.load(open(expected_path))
    client = httpclient.InferenceServerClient(url=url)
    for k, frame in enumerate(frames):
        x = np.asarray([frame], dtype=np.float32)
        binary = k >= len(frames) // 2
        inp = httpclient.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x, binary_data=binary)
        out = httpclient.InferRequestedOutput("speech_probs", binary_data=binary)
        result = client.infer(
            model,
            [inp],
            outputs=[out],
            sequence_id=sequence_id,
            sequence_start=(k == 0),
            sequence_end=(k == len(frames) - 1),
        )
        got = float(result.as_numpy("speech_probs")[0])
        if abs(got - expected[k]) > 1e-5:
            fail(f"step {k}: speech_probs {got} but {expected[k]} carrying the state by hand")
    print(f"ok: {len(frames)} steps of sequence {sequence_id}")


if __name__ == "__main__":
    main()
