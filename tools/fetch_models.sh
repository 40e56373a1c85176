#!/usr/bin/env bash
# Fetch Shoal's two bundled third-party ONNX models from their PyPI wheels
# and verify them against pinned SHA-256 digests.
#
#   models/ch_ppocr_mobile_v2.0_cls_infer.onnx  PaddleOCR text-orientation
#       classifier (Apache-2.0), from rapidocr-onnxruntime==1.4.4:
#       rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx
#   models/silero_vad_16k_sequence.onnx  Silero VAD, 16 kHz sequence
#       variant (MIT), from silero-vad==6.2.3:
#       silero_vad/data/silero_vad_16k_sequence.onnx
#
# Also copies silero-vad's MIT licence from the wheel's dist-info into
# models/licenses/. (The rapidocr wheel ships no licence file; the Apache-2.0
# text is kept in models/licenses/ directly.)
#
# Wheels are pure data here: they are downloaded with --no-deps into a temp
# dir and unzipped, never installed. Any digest mismatch is fatal.
# If the models are already present and verify, nothing is downloaded.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
models="$repo_root/models"
python="${PYTHON:-python3}"

RAPIDOCR_WHEEL=rapidocr_onnxruntime-1.4.4-py3-none-any.whl
RAPIDOCR_WHEEL_SHA256=971d7d5f223a7a808662229df1ef69893809d8457d834e6373d3854bc1782cbf
SILERO_WHEEL=silero_vad-6.2.3-py3-none-any.whl
SILERO_WHEEL_SHA256=7b7f5436cfcb02fae583a05b512ea96467fd449fe54cb49a5e4f06c51a1e43b8

CLS_SRC=rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx
CLS_DST=ch_ppocr_mobile_v2.0_cls_infer.onnx
CLS_SHA256=e47acedf663230f8863ff1ab0e64dd2d82b838fceb5957146dab185a89d6215c
VAD_SRC=silero_vad/data/silero_vad_16k_sequence.onnx
VAD_DST=silero_vad_16k_sequence.onnx
VAD_SHA256=9ccdacc4719d8aa7e45a77536bfabec45a03ba1f2fad5e241ab4060b24238a85
VAD_LICENSE_SRC=silero_vad-6.2.3.dist-info/licenses/LICENSE
VAD_LICENSE_DST=licenses/silero-vad-LICENSE
VAD_LICENSE_SHA256=2e63e9a38b6e8fc0c7bc37ce174caca1862870856c6daf5697cfb785e925520b

die() { echo "fetch_models: ERROR: $*" >&2; exit 1; }

checksums() {
    printf '%s  %s\n' \
        "$CLS_SHA256" "$CLS_DST" \
        "$VAD_SHA256" "$VAD_DST" \
        "$VAD_LICENSE_SHA256" "$VAD_LICENSE_DST"
}

mkdir -p "$models/licenses"

# Fast path: everything already present and correct.
if (cd "$models" && checksums | sha256sum -c --quiet --status) 2>/dev/null; then
    exit 0
fi

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

echo "fetch_models: downloading wheels from PyPI" >&2
"$python" -m pip download --no-deps --quiet --disable-pip-version-check \
    --only-binary=:all: --dest "$tmp/wheels" \
    rapidocr-onnxruntime==1.4.4 silero-vad==6.2.3

(cd "$tmp/wheels" && printf '%s  %s\n' \
    "$RAPIDOCR_WHEEL_SHA256" "$RAPIDOCR_WHEEL" \
    "$SILERO_WHEEL_SHA256" "$SILERO_WHEEL" | sha256sum -c --strict) \
    || die "downloaded wheel does not match its pinned SHA-256"

# Extract with Python's zipfile so no unzip binary is required.
"$python" - "$tmp" <<PY
import shutil, sys, zipfile
tmp = sys.argv[1]
jobs = [
    ("$RAPIDOCR_WHEEL", "$CLS_SRC", "$CLS_DST"),
    ("$SILERO_WHEEL", "$VAD_SRC", "$VAD_DST"),
    ("$SILERO_WHEEL", "$VAD_LICENSE_SRC", "$VAD_LICENSE_DST"),
]
for wheel, src, dst in jobs:
    with zipfile.ZipFile(f"{tmp}/wheels/{wheel}") as zf:
        names = zf.namelist()
        if src not in names:
            sys.exit(f"fetch_models: ERROR: {src} not in {wheel}")
        with zf.open(src) as fin, open(f"{tmp}/{dst.replace('/', '_')}", "wb") as fout:
            shutil.copyfileobj(fin, fout)
PY

# Verify in the temp dir first so a bad download never lands in models/.
mkdir -p "$tmp/out/licenses"
cp "$tmp/$CLS_DST" "$tmp/out/$CLS_DST"
cp "$tmp/$VAD_DST" "$tmp/out/$VAD_DST"
cp "$tmp/${VAD_LICENSE_DST//\//_}" "$tmp/out/$VAD_LICENSE_DST"
(cd "$tmp/out" && checksums | sha256sum -c --strict) \
    || die "extracted file does not match its pinned SHA-256"

cp "$tmp/out/$CLS_DST" "$models/$CLS_DST"
cp "$tmp/out/$VAD_DST" "$models/$VAD_DST"
cp "$tmp/out/$VAD_LICENSE_DST" "$models/$VAD_LICENSE_DST"
(cd "$models" && checksums | sha256sum -c --strict --quiet) \
    || die "installed file does not match its pinned SHA-256"
echo "fetch_models: models/$CLS_DST and models/$VAD_DST verified" >&2
