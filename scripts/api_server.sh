#!/usr/bin/env bash
# OpenAI-compatible API server (scripts/api_server.py; needs fastapi + uvicorn: pip install -r requirements-demo.txt).
# As shipped it serves the embedded tiny model (built on first use). For your own model, set the variables, e.g.
#   MODEL=/path/to/glm-4-9b CHECKPOINT=output/adgen-toy-train-lora-8-5e-3 bash scripts/api_server.sh --port 8080
# Extra flags are passed on (--api_key, --model_name, --max_batch_size, ...; python scripts/api_server.py --help).
set -euo pipefail
source "$(dirname "$0")/common.sh"  # REPO; paths you give are relative to where you run this

MODEL=${MODEL:-$REPO/models/tiny-glm}        # local model folder; models/tiny-glm is built when missing
CHECKPOINT=${CHECKPOINT:-}                    # P-Tuning v2 checkpoint or LoRA adapter folder; empty: the base model
QUANTIZATION_BIT=${QUANTIZATION_BIT:-}        # 4 or 8 (CUDA GPU + bitsandbytes); empty: none
MAX_SOURCE_LENGTH=${MAX_SOURCE_LENGTH:-1024}  # longest prompt in tokens; longer prompts are refused
HOST=${HOST:-127.0.0.1}
PORT=${PORT:-8000}
PYTHON=${PYTHON:-python3}

ensure_model "$MODEL"
extra=()
[ -n "$CHECKPOINT" ] && extra+=(--checkpoint "$CHECKPOINT")
[ -n "$QUANTIZATION_BIT" ] && extra+=(--quantization_bit "$QUANTIZATION_BIT")

exec $PYTHON "$REPO/scripts/api_server.py" \
    --model_name_or_path "$MODEL" \
    --max_source_length "$MAX_SOURCE_LENGTH" \
    --host "$HOST" \
    --port "$PORT" \
    "${extra[@]}" "$@"
