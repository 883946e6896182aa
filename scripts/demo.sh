#!/usr/bin/env bash
# One-command demo, setup included: build the embedded tiny model, train P-Tuning v2 on the toy ADGEN
# data, score the tuned model and the untuned base on the dev set, and print both.
#   bash scripts/demo.sh              # METHOD=lora bash scripts/demo.sh for LoRA
set -euo pipefail
cd "$(dirname "$0")/.."
METHOD=${METHOD:-ptuning}
bash scripts/setup.sh
start=$SECONDS
bash "$METHOD/train.sh"
bash "$METHOD/evaluate.sh"
CHECKPOINT=none bash ptuning/evaluate.sh
trained=$(ls -d output/adgen-toy-"$([ "$METHOD" = ptuning ] && echo pt || echo lora)"-* | head -1)
python3 - "$trained" <<'PY'
import json, sys
rows = [("untuned base", "output/base-model"), ("tuned (" + sys.argv[1] + ")", sys.argv[1])]
print(f"\n{'model':<44} {'BLEU-4':>8} {'Rouge-1':>8} {'Rouge-2':>8} {'Rouge-L':>8}")
for name, folder in rows:
    r = json.load(open(f"{folder}/predict_results.json"))
    print(f"{name:<44} " + " ".join(f"{r['predict_' + k]:8.2f}" for k in ("bleu-4", "rouge-1", "rouge-2", "rouge-l")))
print(f"\npredictions: {sys.argv[1]}/generated_predictions.txt")
PY
echo "demo: build + train + evaluate took $((SECONDS - start)) s"
