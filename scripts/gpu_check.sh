#!/usr/bin/env bash
# End-to-end check on a CUDA GPU: both methods train, save, reload, generate and score with a 4-bit
# (QUANTIZATION_BIT, default 4) frozen base, plus the GPU test file. Prints one line per run.
#   bash scripts/gpu_check.sh            # needs bitsandbytes (pip install -r requirements-gpu.txt)
set -euo pipefail
cd "$(dirname "$0")/.."
BITS=${QUANTIZATION_BIT:-4}
ROOT=${OUT_ROOT:-output/gpu-check}
summary() { python3 -c "import json,sys; r=json.load(open(sys.argv[1])); print(sys.argv[2], {k: round(v, 2) for k, v in r.items() if 'rouge' in k or 'bleu' in k or 'loss' in k})" "$1" "$2"; }

python3 -m pytest -q tests/test_gpu.py tests/test_prefix.py
QUANTIZATION_BIT=$BITS OUTPUT_DIR=$ROOT/pt bash ptuning/train.sh
QUANTIZATION_BIT=$BITS CHECKPOINT=$ROOT/pt bash ptuning/evaluate.sh
QUANTIZATION_BIT=$BITS OUTPUT_DIR=$ROOT/lora bash lora/train.sh
QUANTIZATION_BIT=$BITS CHECKPOINT=$ROOT/lora bash lora/evaluate.sh
QUANTIZATION_BIT=$BITS CHECKPOINT=none OUTPUT_DIR=$ROOT/base bash ptuning/evaluate.sh
summary $ROOT/pt/train_results.json "int$BITS P-Tuning v2 train:"
summary $ROOT/pt/predict_results.json "int$BITS P-Tuning v2 predict:"
summary $ROOT/lora/train_results.json "int$BITS LoRA train:"
summary $ROOT/lora/predict_results.json "int$BITS LoRA predict:"
summary $ROOT/base/predict_results.json "int$BITS base model predict:"
