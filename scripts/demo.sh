#!/usr/bin/env bash
# One-command demo, setup included: build the embedded tiny model, train P-Tuning v2 on the toy ADGEN data,
# score the tuned model and the untuned base on the dev set (evaluate.sh's COMPARE_BASE=1), and print both.
#   bash scripts/demo.sh              # METHOD=lora bash scripts/demo.sh for LoRA
# Outputs go to output/demo-$METHOD under the folder you run it from.
set -euo pipefail
source "$(dirname "$0")/common.sh"
METHOD=${METHOD:-ptuning}
if [ "$METHOD" != ptuning ] && [ "$METHOD" != lora ]; then
    echo "error: METHOD must be ptuning or lora, got '$METHOD'" >&2
    exit 2
fi
TUNED=output/demo-$METHOD
bash "$REPO/scripts/setup.sh"
start=$SECONDS
OUTPUT_DIR=$TUNED bash "$REPO/$METHOD/train.sh"
CHECKPOINT=$TUNED COMPARE_BASE=1 bash "$REPO/$METHOD/evaluate.sh"
echo "demo: build + train + evaluate took $((SECONDS - start)) s"
