#!/usr/bin/env bash
# Build the embedded tiny model when the scripts point at it and it is not there yet: bash scripts/ensure_model.sh MODEL
set -euo pipefail
source "$(dirname "$0")/common.sh"
ensure_model "$1"
