#!/usr/bin/env bash
# Merge a LoRA adapter into its base model and save a plain model folder (loads with transformers alone,
# no peft, no glmtune): see scripts/merge_lora.py.
#   CHECKPOINT=output/adgen-toy-train-lora-8-5e-3 bash lora/merge.sh
# More flags after the command, e.g. --torch_dtype bfloat16 (half the size of float32) or --overwrite.
# An adapter trained on a 4-bit/8-bit base merges into the full-precision base; quantize the merged
# model when you load it (--quantization_bit 4 in the other scripts).
set -euo pipefail
source "$(dirname "$0")/../scripts/common.sh"  # REPO; paths you give are relative to where you run this

MODEL=${MODEL:-$REPO/models/tiny-glm}                       # the base the adapter was trained on
CHECKPOINT=${CHECKPOINT:-output/adgen-toy-train-lora-8-5e-3}  # the LoRA adapter folder (lora/train.sh's OUTPUT_DIR)
OUTPUT=${OUTPUT:-$CHECKPOINT-merged}                        # written as $OUTPUT.partial, then renamed
MAX_SHARD_SIZE=${MAX_SHARD_SIZE:-2GB}                       # largest *.safetensors file

ensure_model "$MODEL"
${PYTHON:-python3} "$REPO/scripts/merge_lora.py" \
    --model_name_or_path "$MODEL" \
    --checkpoint "$CHECKPOINT" \
    --output "$OUTPUT" \
    --max_shard_size "$MAX_SHARD_SIZE" \
    "$@"
