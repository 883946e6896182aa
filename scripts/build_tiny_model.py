"""Build the embedded default base model: a tiny GLM with a tokenizer trained on the toy data.

    python scripts/build_tiny_model.py                     # -> models/tiny-glm (about 30 s on 2 CPU cores)
    python scripts/build_tiny_model.py --out models/x --steps 0   # random weights, for quick experiments

train.sh / evaluate.sh call this when MODEL points at models/tiny-glm and the folder is missing.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout, no install

from glmtune import tiny  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=os.path.join(REPO, "data/adgen-toy/train.json"), help="text to learn from")
    parser.add_argument("--out", default=os.path.join(REPO, "models/tiny-glm"), help="output model folder")
    parser.add_argument("--steps", type=int, default=tiny.PRETRAIN_STEPS, help="pretraining steps (0: random weights)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    start = time.time()
    staging = args.out.rstrip("/") + ".partial"
    loss = tiny.build(args.data, staging, steps=args.steps, seed=args.seed)
    os.replace(staging, args.out)  # a half-built model folder never looks like a model
    print(f"Built {args.out} in {time.time() - start:.0f} s (pretraining loss {loss:.3f})")


if __name__ == "__main__":
    main()
