#!/usr/bin/env bash
# The whole test suite, setup included: bash scripts/test.sh [pytest args]
# (setup_demo.sh adds the web demo / API server extras and headless Chromium for the browser test)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/setup_demo.sh
PYTHON=${PYTHON:-python3}
$PYTHON -m ruff check .            # lint (configured in pyproject.toml)
$PYTHON -m ruff format --check .   # formatting
$PYTHON -m pytest -q -rs "$@"      # -rs: every skip with its reason in the summary
