"""Full fine-tuning: train every weight of the base (or its last N decoder layers), evaluate, predict.

    bash finetune/train.sh       # train on data/adgen-toy with the embedded tiny model
    bash finetune/evaluate.sh    # generate for the dev set, write generated_predictions.txt and scores

Every flag: python finetune/main.py --help (documented in glmtune/arguments.py).
"""

from glmtune.cli import main

if __name__ == "__main__":
    main("finetune")
