#!/usr/bin/env bash
# Build the embedded tiny model when the scripts point at it and it is not there yet.
set -euo pipefail
MODEL=$1
cd "$(dirname "$0")/.."
if [ "$MODEL" = "models/tiny-glm" ] && [ ! -f "$MODEL/config.json" ]; then
    echo "Building the embedded tiny model in $MODEL (first run only) ..."
    ${PYTHON:-python3} scripts/build_tiny_model.py --out "$MODEL"
fi
