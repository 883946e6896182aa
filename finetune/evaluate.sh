#!/usr/bin/env bash
# Evaluation of a fully fine-tuned model, in the shape of ChatGLM-6B's ptuning/evaluate_finetune.sh: generate an
# answer for every row of TEST_FILE, write OUTPUT_DIR/generated_predictions.txt and predict_results.json
# (Rouge-1/2/L, BLEU-4). CHECKPOINT is the training output folder (a complete model folder) or one of its
# checkpoint-N folders (set STEP); by default train.sh's OUTPUT_DIR for the same variables. CHECKPOINT=none scores
# the base MODEL alone; COMPARE_BASE=1 scores the checkpoint and the base in one go and prints both side by side.
# Paths are relative to the folder you run it from.
set -euo pipefail
source "$(dirname "$0")/../scripts/common.sh"  # REPO; paths you give are relative to where you run this

### model
MODEL=${MODEL:-$REPO/models/tiny-glm}         # the base: scored alone with CHECKPOINT=none or COMPARE_BASE=1
QUANTIZATION_BIT=${QUANTIZATION_BIT:-}        # 4 or 8 to quantize the model for evaluation (CUDA GPU + bitsandbytes)
TRAIN_FILE=${TRAIN_FILE:-$REPO/data/adgen-toy/train.json}   # with TRAINABLE_LAYERS and LR: names the default CHECKPOINT
TRAINABLE_LAYERS=${TRAINABLE_LAYERS:-}
LR=${LR:-1e-3}
CHECKPOINT=${CHECKPOINT:-output/$(data_name "$TRAIN_FILE")-ft${TRAINABLE_LAYERS:+-last$TRAINABLE_LAYERS}-$LR}
STEP=${STEP:-}                                # e.g. 300 to use $CHECKPOINT/checkpoint-300
COMPARE_BASE=${COMPARE_BASE:-0}               # 1: also score the untuned base (in OUTPUT_DIR/base), print both
### data
TEST_FILE=${TEST_FILE:-$REPO/data/adgen-toy/dev.json}
DATA_FORMAT=${DATA_FORMAT:-}                  # prompt_response, alpaca, conversations or messages; empty: detected
PROMPT_COLUMN=${PROMPT_COLUMN:-content}
RESPONSE_COLUMN=${RESPONSE_COLUMN:-summary}
HISTORY_COLUMN=${HISTORY_COLUMN:-}
MAX_SOURCE_LENGTH=${MAX_SOURCE_LENGTH:-64}
MAX_TARGET_LENGTH=${MAX_TARGET_LENGTH:-64}
### decoding
EVAL_BATCH_SIZE=${EVAL_BATCH_SIZE:-32}        # prompts generated together (left-padded)
OUTPUT_DIR=${OUTPUT_DIR:-$CHECKPOINT}
PYTHON=${PYTHON:-python3}
### processes (README: Several GPUs and machines)
NUM_GPUS=${NUM_GPUS:-1}                       # processes on this machine, one per GPU (torchrun when > 1)
NNODES=${NNODES:-1}                           # machines; each one runs this script with its NODE_RANK
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}         # node 0's address and a free port there (NNODES > 1)
MASTER_PORT=${MASTER_PORT:-29500}
DEEPSPEED=${DEEPSPEED:-}                      # a DeepSpeed config, e.g. scripts/deepspeed/zero3.json; empty: none

source "$REPO/scripts/method.sh"
evaluate_method finetune "$@"
