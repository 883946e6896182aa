#!/usr/bin/env bash
# Full fine-tuning (every weight of the base, or its last TRAINABLE_LAYERS decoder layers), in the shape of
# ChatGLM-6B's ptuning/ds_train_finetune.sh. Each checkpoint is a complete model folder.
# As shipped it trains the embedded tiny model on the toy ADGEN data (built on first use, no download), from any
# folder: the paths you set are relative to the folder you run it from.
# For your own run, edit the variables below (or set them in the environment), e.g. ChatGLM-6B's published recipe
# (4 GPUs x 4 samples, fp16 there, bf16 mixed precision here):
#   MODEL=/path/to/chatglm-6b TRAIN_FILE=AdvertiseGen/train.json DEV_FILE=AdvertiseGen/dev.json NUM_GPUS=4
#   DEEPSPEED=scripts/deepspeed/zero2.json LR=1e-4 MAX_SOURCE_LENGTH=64 MAX_TARGET_LENGTH=64 BATCH_SIZE=4 GRAD_ACCUM=1
#   MAX_STEPS=5000 SAVE_STEPS=1000 GRADIENT_CHECKPOINTING=1
# Memory: README, Full fine-tuning (a 6B model on one GPU: --optim paged_adamw_8bit, 48 GiB on an H200; or
# DEEPSPEED=scripts/deepspeed/zero3_offload.json with about 27 bytes of host memory per parameter).
set -euo pipefail
source "$(dirname "$0")/../scripts/common.sh"  # REPO; paths you give are relative to where you run this

### model
MODEL=${MODEL:-$REPO/models/tiny-glm}         # local model folder; models/tiny-glm is built when missing
### data
TRAIN_FILE=${TRAIN_FILE:-$REPO/data/adgen-toy/train.json}
DEV_FILE=${DEV_FILE:-$REPO/data/adgen-toy/dev.json}
DATA_FORMAT=${DATA_FORMAT:-}                  # prompt_response, alpaca, conversations or messages (data/README.md);
                                              # empty: detected from each file's first record
PROMPT_COLUMN=${PROMPT_COLUMN:-content}       # prompt_response's fields
RESPONSE_COLUMN=${RESPONSE_COLUMN:-summary}
HISTORY_COLUMN=${HISTORY_COLUMN:-}            # field with earlier [query, answer] rounds; empty: none
MAX_SOURCE_LENGTH=${MAX_SOURCE_LENGTH:-64}
MAX_TARGET_LENGTH=${MAX_TARGET_LENGTH:-64}
### method
TRAINABLE_LAYERS=${TRAINABLE_LAYERS:-}        # N: train only the last N decoder layers ("freeze" tuning); empty: all
LR=${LR:-1e-3}                                # ChatGLM-6B's full fine-tuning uses 1e-4 on its 6B model
### training
BATCH_SIZE=${BATCH_SIZE:-16}                  # per device; BATCH_SIZE x GRAD_ACCUM is the effective batch
GRAD_ACCUM=${GRAD_ACCUM:-1}
GRADIENT_CHECKPOINTING=${GRADIENT_CHECKPOINTING:-0}  # 1: recompute each layer's activations in backward (6B models)
MAX_STEPS=${MAX_STEPS:-200}
SAVE_STEPS=${SAVE_STEPS:-100}
SAVE_TOTAL_LIMIT=${SAVE_TOTAL_LIMIT:-}        # N: keep only the newest N checkpoints (each holds the whole model and
                                              # its optimizer state); empty: keep all
OUTPUT_DIR=${OUTPUT_DIR:-output/$(data_name "$TRAIN_FILE")-ft${TRAINABLE_LAYERS:+-last$TRAINABLE_LAYERS}-$LR}
                                              # e.g. output/adgen-toy-train-ft-1e-3
PREVIOUS_RUN=${PREVIOUS_RUN:-move}            # OUTPUT_DIR holding another run's files: move them aside to
                                              # OUTPUT_DIR.previous-<time> (move) or stop (refuse); to continue that
                                              # run instead: bash <this script> --resume_from_checkpoint last
PYTHON=${PYTHON:-python3}
### processes (README: Several GPUs and machines)
NUM_GPUS=${NUM_GPUS:-1}                       # processes on this machine, one per GPU (torchrun when > 1)
NNODES=${NNODES:-1}                           # machines; each one runs this script with its NODE_RANK
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}         # node 0's address and a free port there (NNODES > 1)
MASTER_PORT=${MASTER_PORT:-29500}
DEEPSPEED=${DEEPSPEED:-}                      # a DeepSpeed config, e.g. scripts/deepspeed/zero3_offload.json; empty: none

source "$REPO/scripts/method.sh"
method_flags=()
[ -n "$TRAINABLE_LAYERS" ] && method_flags+=(--trainable_layers "$TRAINABLE_LAYERS")
[ -n "$SAVE_TOTAL_LIMIT" ] && method_flags+=(--save_total_limit "$SAVE_TOTAL_LIMIT")
case "$GRADIENT_CHECKPOINTING" in
    1) method_flags+=(--gradient_checkpointing) ;;
    0) ;;
    *) echo "error: GRADIENT_CHECKPOINTING must be 0 or 1, got '$GRADIENT_CHECKPOINTING'" >&2; exit 2 ;;
esac
train_method finetune "${method_flags[@]}" "$@"
