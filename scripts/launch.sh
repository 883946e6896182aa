#!/usr/bin/env bash
# Sourced by ptuning/, lora/ and finetune/ train.sh and evaluate.sh after common.sh and their variables: sets `launch`, the
# command that starts main.py, and adds --deepspeed to `extra`. One process per GPU, always:
#   NUM_GPUS=1, NNODES=1, no DEEPSPEED (the defaults): one plain `$PYTHON main.py` process, as before.
#   NUM_GPUS=N: N data-parallel processes on this machine through torchrun. Never one process driving several
#     GPUs: the ChatGLM scripts' DataParallel ran out of memory on the first GPU (glmtune refuses it).
#   NNODES=M: N processes on each of M machines; run the script on every one with its NODE_RANK (0..M-1) and
#     node 0's address and a free port there (MASTER_ADDR, MASTER_PORT). OUTPUT_DIR must be shared storage.
#   DEEPSPEED=scripts/deepspeed/zero3.json: HF Trainer's DeepSpeed integration with that config (CUDA GPUs).
NUM_GPUS=${NUM_GPUS:-1}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
DEEPSPEED=${DEEPSPEED:-}

for name in NUM_GPUS NNODES NODE_RANK MASTER_PORT; do
    if ! [[ ${!name} =~ ^[0-9]+$ ]] || { [ "$name" != NODE_RANK ] && [ "${!name}" -lt 1 ]; }; then
        echo "error: $name must be a positive whole number, got '${!name}'" >&2
        exit 2
    fi
done
if [ "$NNODES" -gt 1 ]; then
    launch=($PYTHON -m torch.distributed.run --nnodes "$NNODES" --node_rank "$NODE_RANK"
            --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" --nproc_per_node "$NUM_GPUS")
elif [ "$NUM_GPUS" -gt 1 ] || [ -n "$DEEPSPEED" ]; then
    # --standalone: a rendezvous on this machine at a free port, so that several runs can share it.
    launch=($PYTHON -m torch.distributed.run --standalone --nproc_per_node "$NUM_GPUS")
else
    launch=($PYTHON)
fi
if [ -n "$DEEPSPEED" ]; then
    extra+=(--deepspeed "$DEEPSPEED")
fi
