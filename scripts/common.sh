# Sourced by every script that starts glmtune's Python code: that code is this checkout's, whichever one
# pip installed (an editable install points at one checkout only).
export PYTHONPATH="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)${PYTHONPATH:+:$PYTHONPATH}"
# CUDA: memory grows in expandable segments rather than fixed blocks, so that training's varying batch shapes do
# not fragment it (the memory plan of --max_memory_gib counts on what is reserved staying close to what is used).
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
