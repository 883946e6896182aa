#!/usr/bin/env bash
# Merge LoRA adapters into their base model and save a plain model folder (loads with transformers alone,
# no peft, no glmtune): see scripts/merge_lora.py.
#   CHECKPOINT=output/adgen-toy-train-lora-8-5e-3 bash lora/merge.sh
#   CHECKPOINT=output/stage1,output/stage2 bash lora/merge.sh     # stage2 trained on the base with stage1 merged
# More flags after the command, e.g. --torch_dtype bfloat16 (half the size of float32) or --overwrite.
# An adapter trained on a 4-bit/8-bit base merges into the full-precision base; quantize the merged
# model when you load it (--quantization_bit 4 in the other scripts).
set -euo pipefail
source "$(dirname "$0")/../scripts/common.sh"  # REPO; paths you give are relative to where you run this

MODEL=${MODEL:-$REPO/models/tiny-glm}                       # the base the adapter was trained on
CHECKPOINT=${CHECKPOINT:-output/adgen-toy-train-lora-8-5e-3}  # the LoRA adapter folder (lora/train.sh's OUTPUT_DIR);
                                                            # several, comma-separated, are merged in that order
OUTPUT=${OUTPUT:-${CHECKPOINT##*,}-merged}                  # (default: after the last adapter) written as
                                                            # $OUTPUT.partial, then renamed
MAX_SHARD_SIZE=${MAX_SHARD_SIZE:-2GB}                       # largest *.safetensors file (several files + an index
                                                            # when the model is larger)

ensure_model "$MODEL"
${PYTHON:-python3} "$REPO/scripts/merge_lora.py" \
    --model_name_or_path "$MODEL" \
    --checkpoint "$CHECKPOINT" \
    --output "$OUTPUT" \
    --max_shard_size "$MAX_SHARD_SIZE" \
    "$@"
