# Sourced by every script that starts glmtune's Python code: that code is this checkout's, whichever one
# pip installed (an editable install points at one checkout only).
export PYTHONPATH="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)${PYTHONPATH:+:$PYTHONPATH}"
