"""P-Tuning v2: train a prefix encoder on a frozen (optionally 4/8-bit) base, evaluate, predict.

    bash ptuning/train.sh       # train on data/adgen-toy with the embedded tiny model
    bash ptuning/evaluate.sh    # generate for the dev set, write generated_predictions.txt and scores

Every flag: python ptuning/main.py --help (documented in glmtune/arguments.py).
"""

from glmtune.cli import main

if __name__ == "__main__":
    main("ptuning")
