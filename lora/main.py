"""LoRA: train PEFT LoRA adapters on a frozen (optionally 4/8-bit) base, evaluate, predict.

    bash lora/train.sh       # train on data/adgen-toy with the embedded tiny model
    bash lora/evaluate.sh    # generate for the dev set, write generated_predictions.txt and scores

Every flag: python lora/main.py --help (documented in glmtune/arguments.py).
"""

from glmtune.cli import main

if __name__ == "__main__":
    main("lora")
