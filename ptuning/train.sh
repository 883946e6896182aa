#!/usr/bin/env bash
# P-Tuning v2 training, in the shape of ChatGLM-6B's ptuning/train.sh.
# As shipped it trains the embedded tiny model on the toy ADGEN data (built on first use, no download), from any
# folder: the paths you set are relative to the folder you run it from.
# For your own run, edit the variables below (or set them in the environment), e.g. for ChatGLM's
# published recipe: MODEL=/path/to/glm-4-9b TRAIN_FILE=AdvertiseGen/train.json DEV_FILE=AdvertiseGen/dev.json
#   PRE_SEQ_LEN=128 LR=2e-2 QUANTIZATION_BIT=4 MAX_SOURCE_LENGTH=64 MAX_TARGET_LENGTH=64 BATCH_SIZE=1 GRAD_ACCUM=16 MAX_STEPS=3000
# On a GPU, BATCH_SIZE x GRAD_ACCUM (16) is run as fits MAX_MEMORY_GIB: on an H200 limited to 6 GiB that recipe ran
# with every layer checkpointed, 3000 steps in about 10 min (P-Tuning v2, 16 x 1) / 28 min (LoRA, 8 x 2; 15 min within
# 8 GiB), where transformers + PEFT at 1 x 16 take 2.1 / 5.2 hours; docs/benchmarks.md, run 23.
set -euo pipefail
source "$(dirname "$0")/../scripts/common.sh"  # REPO; paths you give are relative to where you run this

### model
MODEL=${MODEL:-$REPO/models/tiny-glm}         # local model folder; models/tiny-glm is built when missing
QUANTIZATION_BIT=${QUANTIZATION_BIT:-}        # 4 or 8 to quantize the frozen base (CUDA GPU + bitsandbytes); empty: none
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
PRE_SEQ_LEN=${PRE_SEQ_LEN:-32}                # ChatGLM-6B uses 128 on its 28-layer model
LR=${LR:-2e-2}
PTUNING_CHECKPOINT=${PTUNING_CHECKPOINT:-}    # a prefix to train further on TRAIN_FILE (a warm start: new optimizer
                                              # and schedule); PRE_SEQ_LEN must match its prefix_config.json
### training
BATCH_SIZE=${BATCH_SIZE:-16}                  # per device; BATCH_SIZE x GRAD_ACCUM is the effective batch
GRAD_ACCUM=${GRAD_ACCUM:-1}
MAX_MEMORY_GIB=${MAX_MEMORY_GIB:-}            # GPU memory the run may use: on a GPU glmtune picks the micro-batch and
                                              # the checkpointed layers that fit, keeping the effective batch (the
                                              # ancestors' 1 x 16 runs as e.g. 16 x 1). Empty: what the GPU has free.
MAX_STEPS=${MAX_STEPS:-200}
SAVE_STEPS=${SAVE_STEPS:-100}
OUTPUT_DIR=${OUTPUT_DIR:-output/$(data_name "$TRAIN_FILE")-pt-$PRE_SEQ_LEN-$LR}  # e.g. output/adgen-toy-train-pt-32-2e-2
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
DEEPSPEED=${DEEPSPEED:-}                      # a DeepSpeed config, e.g. scripts/deepspeed/zero3.json; empty: none

source "$REPO/scripts/method.sh"
method_flags=(--pre_seq_len "$PRE_SEQ_LEN")
[ -n "$PTUNING_CHECKPOINT" ] && method_flags+=(--ptuning_checkpoint "$PTUNING_CHECKPOINT")
train_method ptuning "${method_flags[@]}" "$@"
