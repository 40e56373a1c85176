#!/usr/bin/env python3
"""Streams a spoken sentence through Silero VAD on Shoal and prints where
speech starts and ends.

The clip is made on the spot with espeak-ng (Debian's espeak-ng, which
scripts/setup installs), resampled to 16 kHz, padded with a second of
silence on each side, and sent through the gateway as one sequence of
576-sample steps (Triton's sequence_id / sequence_start / sequence_end
parameters); the replica keeps the model's state (h, c) between steps.

Usage: tools/vad_demo.py [--gateway URL] [--model vad] [--text TEXT] [--json]
       tools/vad_demo.py --save-frames FILE [--text TEXT]   (the frames as JSON, nothing sent)

The model must be pushed as a stateful model and deployed first:
  shoal model push vad models/silero_vad_16k_sequence.onnx --state h=hn --state c=cn
  shoal deploy vad:1
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
import wave

import numpy as np

RATE = 16_000
FRAME = 576
THRESHOLD = 0.5


def speak(text):
    """The sentence as 16 kHz float samples, a second of silence around it."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "clip.wav")
        subprocess.run(["espeak-ng", "-w", path, text], check=True)
        with wave.open(path) as w:
            rate = w.getframerate()
            samples = np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16)
    samples = samples.astype(np.float32) / 32768.0
    # Linear resampling to 16 kHz is plenty for a voice detector.
    n = int(len(samples) * RATE / rate)
    resampled = np.interp(np.arange(n) * rate / RATE, np.arange(len(samples)), samples)
    silence = np.zeros(RATE, dtype=np.float32)
    return np.concatenate([silence, resampled.astype(np.float32), silence]), len(resampled) / RATE


def step(url, sequence_id, frame, start, end):
    body = json.dumps({
        "parameters": {"sequence_id": sequence_id, "sequence_start": start, "sequence_end": end},
        "inputs": [{"name": "input", "shape": [1, FRAME], "datatype": "FP32",
                    "data": [float(x) for x in frame]}],
    }).encode()
    request = urllib.request.Request(url, body, {"content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.load(response)["outputs"][0]["data"][0]
    except urllib.error.HTTPError as e:
        sys.exit(f"vad_demo: step refused ({e.code}): {e.read().decode(errors='replace')}")


MIN_SILENCE = 0.1  # seconds: shorter pauses do not split speech


def segments(probs):
    """(start s, end s) of each run of frames above the threshold, runs
    closer than MIN_SILENCE merged."""
    found, start = [], None
    for k, p in enumerate(probs + [0.0]):
        t = k * FRAME / RATE
        if p >= THRESHOLD and start is None:
            start = t
        elif p < THRESHOLD and start is not None:
            if found and start - found[-1][1] < MIN_SILENCE:
                start = found.pop()[0]
            found.append((start, t))
            start = None
    return [(round(a, 2), round(b, 2)) for a, b in found]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gateway", default="http://127.0.0.1:8080")
    parser.add_argument("--model", default="vad")
    parser.add_argument("--text", default="Shoal keeps models available everywhere, all the time.")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--save-frames", metavar="FILE")
    args = parser.parse_args()
    audio, spoken = speak(args.text)
    url = f"{args.gateway}/v2/models/{args.model}/infer"
    frames = [audio[i:i + FRAME] for i in range(0, len(audio) - FRAME + 1, FRAME)]
    if args.save_frames:
        with open(args.save_frames, "w") as out:
            json.dump([[float(x) for x in f] for f in frames], out)
        return
    sequence_id = f"demo-{os.getpid()}"
    probs = [step(url, sequence_id, f, k == 0, k == len(frames) - 1) for k, f in enumerate(frames)]
    found = segments(probs)
    if args.json:
        print(json.dumps({"speech": found, "spoken": [1.0, round(1.0 + spoken, 2)],
                          "frames": len(frames)}))
        return
    print(f"{len(frames)} steps of {FRAME} samples; the sentence is spoken from 1.00 s to {1.0 + spoken:.2f} s")
    for start, end in found:
        print(f"  speech {start:5.2f} s – {end:5.2f} s")
    if not found:
        print("  no speech found")


if __name__ == "__main__":
    main()
