#!/usr/bin/env bash
# The whole test suite, setup included: bash scripts/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
${PYTHON:-python3} -m pytest -q "$@"
