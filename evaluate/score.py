"""Score a generated_predictions.txt with the project's ROUGE / BLEU-4 metrics, or several side by side.

Usage: python evaluate/score.py PATH [--output scores.json]
       python evaluate/score.py BASE_PATH TUNED_PATH --labels "untuned base" tuned   # one column each
"""

import argparse
import json
import os
import sys
import tempfile

from glmtune.errors import GlmtuneError, exit_with
from glmtune.metrics import METRIC_KEYS, score_file


def format_table(columns: dict) -> str:
    """Render {column label: scores} as a text table: one row per metric, one column per label."""
    rows = [("metric", *columns)]
    rows += [(key, *(f"{scores[key]:.4f}" for scores in columns.values())) for key in METRIC_KEYS]
    rows.append(("samples", *(str(scores["samples"]) for scores in columns.values())))
    name_width = max(len(row[0]) for row in rows)
    widths = [max(10, len(label)) for label in columns]
    lines = (f"{name:<{name_width}}" + "".join(f"  {c:>{w}}" for c, w in zip(cells, widths)) for name, *cells in rows)
    return "\n".join(lines)


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
    parser.add_argument("paths", nargs="+", metavar="path", help="generated_predictions.txt files")
    parser.add_argument("--labels", nargs="+", help="column headings, one per path (default: the paths)")
    parser.add_argument("--output", help="also write the scores to this JSON file ({label: scores} for several paths)")
    args = parser.parse_args(argv)
    labels = args.labels or (["value"] if len(args.paths) == 1 else args.paths)
    if len(labels) != len(args.paths):
        exit_with(GlmtuneError(f"--labels: {len(labels)} given for {len(args.paths)} paths (one per path)"))
    try:
        columns = {label: score_file(path) for label, path in zip(labels, args.paths)}
    except (OSError, ValueError) as exc:
        exit_with(exc)
    print(format_table(columns))
    if args.output:
        try:
            write_json_atomic(args.output, columns if len(columns) > 1 else next(iter(columns.values())))
        except OSError as exc:
            exit_with(GlmtuneError(f"cannot write {args.output}: {exc.strerror or exc}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
