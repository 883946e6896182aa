#!/usr/bin/env bash
# One-command demo, setup included: build the embedded tiny model, train P-Tuning v2 on the toy ADGEN
# data, score the tuned model and the untuned base on the dev set, and print both.
#   bash scripts/demo.sh              # METHOD=lora bash scripts/demo.sh for LoRA
set -euo pipefail
cd "$(dirname "$0")/.."
METHOD=${METHOD:-ptuning}
TUNED=output/demo-$METHOD
BASE=output/demo-base
bash scripts/setup.sh
start=$SECONDS
OUTPUT_DIR=$TUNED bash "$METHOD/train.sh"
CHECKPOINT=$TUNED bash "$METHOD/evaluate.sh"
CHECKPOINT=none OUTPUT_DIR=$BASE bash "$METHOD/evaluate.sh"
python3 - "$BASE" "$TUNED" <<'PY'
import json, sys
print(f"\n{'model (toy dev set)':<28} {'BLEU-4':>8} {'Rouge-1':>8} {'Rouge-2':>8} {'Rouge-L':>8}")
for name, folder in zip(("untuned base", "tuned: " + sys.argv[2]), sys.argv[1:]):
    r = json.load(open(f"{folder}/predict_results.json"))
    print(f"{name:<28} " + " ".join(f"{r['predict_' + k]:8.2f}" for k in ("bleu-4", "rouge-1", "rouge-2", "rouge-l")))
print(f"\npredictions: {sys.argv[2]}/generated_predictions.txt")
PY
echo "demo: build + train + evaluate took $((SECONDS - start)) s"
