#!/usr/bin/env bash
# Install what glmtune needs into the current Python (activate a virtualenv first if you want one).
# Safe to run again: pip skips what is already there.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
pip_install() { "$PYTHON" -m pip install --disable-pip-version-check -q "$@"; }

if ! "$PYTHON" -c "import torch" 2>/dev/null; then
    # Pin a release: an open range would fetch the newest (multi-GB CUDA) build even on CPU-only machines.
    pip_install "torch==2.13.0"
fi
pip_install -r requirements-dev.txt
pip_install --no-deps --no-build-isolation -e .  # glmtune itself, from this checkout (editable)
if command -v nvidia-smi >/dev/null 2>&1; then
    pip_install -r requirements-gpu.txt  # bitsandbytes, for QUANTIZATION_BIT=4/8
fi
"$PYTHON" -c "import torch, transformers, peft; print(f'glmtune setup: torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}')"
