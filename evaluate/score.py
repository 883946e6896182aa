"""Score a generated_predictions.txt with the project's ROUGE / BLEU-4 metrics.

Usage: python evaluate/score.py PATH [--output scores.json]
"""

import argparse
import json
import os
import sys
import tempfile

from glmtune.errors import GlmtuneError, exit_with
from glmtune.metrics import METRIC_KEYS, score_file


def format_table(scores: dict) -> str:
    """Render scores as a two-column text table."""
    rows = [("metric", "value")]
    rows += [(key, f"{scores[key]:.4f}") for key in METRIC_KEYS]
    rows.append(("samples", str(scores["samples"])))
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value:>10}" for name, value in rows)


def write_json_atomic(path: str, data: dict) -> None:
    """Write JSON to a temp file in the target's folder, then rename it into place,
    so an interrupted run never leaves a truncated scores file."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".score-", suffix=".json.tmp", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(data, handle, indent=2, ensure_ascii=False)
            handle.write("\n")
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Score a generated_predictions.txt (ROUGE-1/2/L, BLEU-4).")
    parser.add_argument("path", help='generated_predictions.txt: one {"labels": ..., "predict": ...} JSON per line')
    parser.add_argument("--output", help="also write the scores to this JSON file")
    args = parser.parse_args(argv)
    try:
        scores = score_file(args.path)
    except (OSError, ValueError) as exc:
        exit_with(exc)
    print(format_table(scores))
    if args.output:
        try:
            write_json_atomic(args.output, scores)
        except OSError as exc:
            exit_with(GlmtuneError(f"cannot write {args.output}: {exc.strerror or exc}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
