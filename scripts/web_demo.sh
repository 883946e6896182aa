#!/usr/bin/env bash
# Chat with a tuned model in the browser (Gradio), like ChatGLM-6B's web_demo.sh.
# As shipped it serves the embedded tiny model (built on first use); point CHECKPOINT at your training output:
#   CHECKPOINT=output/adgen-toy-train-pt-32-2e-2/checkpoint-200 bash scripts/web_demo.sh
# then open http://127.0.0.1:7860. Needs the demo extras: bash scripts/setup_demo.sh
# Extra flags go to scripts/web_demo.py (e.g. --host 0.0.0.0, --share; see --help).
set -euo pipefail
source "$(dirname "$0")/common.sh"  # REPO; paths you give are relative to where you run this

MODEL=${MODEL:-$REPO/models/tiny-glm}        # local model folder; models/tiny-glm is built when missing
CHECKPOINT=${CHECKPOINT:-}                    # P-Tuning v2 checkpoint or LoRA adapter folder; empty or none: the base model
QUANTIZATION_BIT=${QUANTIZATION_BIT:-}        # 4 or 8 (CUDA GPU + bitsandbytes); empty: none
PROMPT_TEMPLATE=${PROMPT_TEMPLATE:-auto}      # as in training: auto, chat_template, chatglm2, chatglm or raw
HOST=${HOST:-127.0.0.1}
PORT=${PORT:-7860}
PYTHON=${PYTHON:-python3}

ensure_model "$MODEL"
extra=()
[ -n "$CHECKPOINT" ] && [ "$CHECKPOINT" != none ] && extra+=(--checkpoint "$CHECKPOINT")
[ -n "$QUANTIZATION_BIT" ] && extra+=(--quantization_bit "$QUANTIZATION_BIT")

exec $PYTHON "$REPO/scripts/web_demo.py" \
    --model_name_or_path "$MODEL" \
    --prompt_template "$PROMPT_TEMPLATE" \
    --host "$HOST" \
    --port "$PORT" \
    "${extra[@]}" "$@"
