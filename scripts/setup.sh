#!/usr/bin/env bash
# Creates .venv (if missing) and installs cogtune into it. Idempotent.
# torch goes in first, pinned to the CPU build on this kind of machine: installed later, or pulled in by another
# package, pip would resolve a multi-GB CUDA build (see DESIGN notes). Set COGTUNE_TORCH to choose another spec.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
if ! python -c "import torch" 2>/dev/null; then
  python -m pip install -q --upgrade pip
  python -m pip install -q "${COGTUNE_TORCH:-torch==2.13.0}"
fi
python -m pip install -q -e ".[test,deepspeed,ui]"
python -c "import torch, diffusers, cogtune; print(f'cogtune ready: torch {torch.__version__}, diffusers {diffusers.__version__}')"
