#!/usr/bin/env bash
# Install what glmtune needs into the current Python (activate a virtualenv first if you want one).
# Safe to run again: pip skips what is already there. Each step is announced before it runs, and pip says
# what it collects, downloads and installs.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
step() { echo "glmtune setup: $*"; }
pip_install() {
    local progress=()
    [ -t 1 ] || progress=(--progress-bar off)  # a redirected log gets pip's lines, not its bar
    "$PYTHON" -m pip install --disable-pip-version-check "${progress[@]}" "$@"
}

if ! "$PYTHON" -c "import torch" 2>/dev/null; then
    # Pin a release: an open range would fetch the newest (multi-GB CUDA) build even on CPU-only machines.
    step "no torch in $("$PYTHON" -c 'import sys; print(sys.executable)'): installing torch==2.13.0 ..."
    pip_install "torch==2.13.0"
fi
step "installing requirements-dev.txt: transformers, peft, accelerate, datasets, the metrics' jieba/rouge/nltk, matplotlib, pytest, ruff ..."
pip_install -r requirements-dev.txt
step "installing glmtune itself from $PWD (editable) ..."
pip_install --no-deps --no-build-isolation -e .
if command -v nvidia-smi >/dev/null 2>&1; then
    step "nvidia-smi found: installing requirements-gpu.txt (bitsandbytes, for QUANTIZATION_BIT=4/8) ..."
    pip_install -r requirements-gpu.txt
fi
"$PYTHON" -c "import torch, transformers, peft; print(f'glmtune setup: done: torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}')"
