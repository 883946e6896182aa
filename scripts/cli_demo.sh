#!/usr/bin/env bash
# Chat with the base model or a tuned one in the terminal (ChatGLM's cli_demo.py): see scripts/cli_demo.py.
#   bash scripts/cli_demo.sh                                              # the embedded tiny model, untuned
#   CHECKPOINT=output/adgen-toy-train-lora-8-5e-3 bash scripts/cli_demo.sh # + a LoRA adapter or a P-Tuning v2 checkpoint
# More flags after the command, e.g. --quantization_bit 4 --max_new_tokens 256 --do_sample.
set -euo pipefail
source "$(dirname "$0")/common.sh"  # REPO; paths you give are relative to where you run this

MODEL=${MODEL:-$REPO/models/tiny-glm}        # local model folder; models/tiny-glm is built when missing
CHECKPOINT=${CHECKPOINT:-}                    # P-Tuning v2 folder or LoRA adapter; empty: the base alone

ensure_model "$MODEL"
extra=()
[ -n "$CHECKPOINT" ] && extra+=(--checkpoint "$CHECKPOINT")
${PYTHON:-python3} "$REPO/scripts/cli_demo.py" --model_name_or_path "$MODEL" "${extra[@]}" "$@"
