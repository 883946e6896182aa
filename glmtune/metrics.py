"""ROUGE / BLEU-4 metrics, identical to the ChatGLM-6B / ChatGLM2-6B ``ptuning`` scripts.

This is the project's single implementation of the metrics; it imports nothing
from ``glmtune`` so that ``evaluate/score.py`` can use it on its own.

Per sample (prediction, label):

* ROUGE-1 / ROUGE-2 / ROUGE-L: both strings are cut into words with
  ``jieba.cut``, the words are joined with spaces and scored with
  ``rouge_chinese.Rouge().get_scores(hyp, ref)[0]``; the ``"f"`` value is kept,
  multiplied by 100 and rounded to 4 decimals.
* BLEU-4: ``nltk`` ``sentence_bleu([list(label)], list(prediction))`` over
  CHARACTERS (not words) with ``SmoothingFunction().method3``, default weights
  (0.25, 0.25, 0.25, 0.25), ×100, rounded to 4 decimals.

Corpus scores are the arithmetic means of the per-sample scores.
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import jieba
import numpy as np
from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
from rouge_chinese import Rouge

METRIC_KEYS = ("rouge-1", "rouge-2", "rouge-l", "bleu-4")

# jieba logs "Building prefix dict ..." on first use, and nltk warns about zero
# n-gram counts on almost every short sample; both only add noise to the logs.
jieba.setLogLevel(logging.WARNING)
warnings.filterwarnings("ignore", category=UserWarning, module=r"nltk\.translate\.bleu_score")

_ROUGE = Rouge()
_SMOOTHING = SmoothingFunction().method3


def _zero_scores() -> dict[str, float]:
    return {key: 0.0 for key in METRIC_KEYS}


def score_pair(prediction: str, label: str) -> dict[str, float]:
    """Score one prediction against one label (all values in 0..100).

    Empty-string rule: if the prediction or the label is empty or whitespace
    only (so its space-joined jieba words are blank), all four scores are 0.0,
    including when both are empty. The reference scripts crash in this case
    (rouge_chinese raises ``ValueError: Hypothesis is empty.``); scoring 0
    instead follows ChatGLM-Efficient-Tuning and keeps one bad generation from
    aborting a whole evaluation.
    """
    hypothesis = " ".join(jieba.cut(prediction))
    reference = " ".join(jieba.cut(label))
    if not hypothesis.strip() or not reference.strip():
        return _zero_scores()
    rouge = _ROUGE.get_scores(hypothesis, reference)[0]
    scores = {key: round(rouge[key]["f"] * 100, 4) for key in ("rouge-1", "rouge-2", "rouge-l")}
    bleu = sentence_bleu([list(label)], list(prediction), smoothing_function=_SMOOTHING)
    scores["bleu-4"] = round(bleu * 100, 4)
    return scores


def score_corpus(predictions: Sequence[str], labels: Sequence[str]) -> dict[str, float]:
    """Average the per-sample scores of aligned predictions and labels.

    Raises ValueError when the lengths differ or there is nothing to score
    (a mean over zero samples would be NaN and silently poison the results).
    """
    predictions, labels = list(predictions), list(labels)
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions but {len(labels)} labels")
    if not predictions:
        raise ValueError("no samples to score")
    per_sample = [score_pair(prediction, label) for prediction, label in zip(predictions, labels)]
    return {key: float(np.mean([s[key] for s in per_sample])) for key in METRIC_KEYS}


def decode_texts(tokenizer: Any, ids: Iterable[Iterable[int]]) -> list[str]:
    """Decode token-id rows to stripped strings.

    Negative ids (the -100 label/padding fill used by HF) are replaced by
    ``tokenizer.pad_token_id`` first: fast tokenizers raise OverflowError on
    negative ids, and the pad token is dropped by ``skip_special_tokens``.
    Rows are handled one at a time so ragged (list-of-lists) input works too.
    """
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        raise ValueError("tokenizer has no pad_token_id to replace negative ids with")
    rows = []
    for row in ids:
        row = np.asarray(row)
        rows.append(np.where(row < 0, pad_id, row).tolist())
    texts = tokenizer.batch_decode(rows, skip_special_tokens=True)
    return [text.strip() for text in texts]


class ComputeMetrics:
    """``compute_metrics`` callable for HF ``Seq2SeqTrainer`` with ``predict_with_generate``.

    Accepts an ``EvalPrediction`` (``.predictions``, ``.label_ids``) or a plain
    ``(predictions, labels)`` tuple; ``predictions`` may itself be a tuple whose
    first element holds the generated ids.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def __call__(self, eval_preds: Any) -> dict[str, float]:
        if hasattr(eval_preds, "predictions"):
            preds, labels = eval_preds.predictions, eval_preds.label_ids
        else:
            preds, labels = eval_preds
        if isinstance(preds, tuple):
            preds = preds[0]
        predictions = decode_texts(self.tokenizer, preds)
        references = decode_texts(self.tokenizer, labels)
        return score_corpus(predictions, references)


def _parse_line(path: str, lineno: int, line: str) -> tuple[str, str]:
    """Return (predict, labels) of one line, or raise ValueError naming path:line."""
    where = f"{path}:{lineno}"
    if not line.strip():
        raise ValueError(f"{where}: blank line (expected a JSON object)")
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{where}: invalid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    values = []
    for key in ("predict", "labels"):
        if key not in record:
            raise ValueError(f"{where}: missing key {key!r}")
        if not isinstance(record[key], str):
            raise ValueError(f"{where}: field {key!r} must be a string, got {type(record[key]).__name__}")
        values.append(record[key])
    return values[0], values[1]


def read_predictions(path: str) -> tuple[list[str], list[str]]:
    """Read a ``generated_predictions.txt``: one ``{"labels": ..., "predict": ...}`` JSON per line.

    Returns (predictions, labels). Every line must be a JSON object with string
    values for both keys; blank lines are errors, except that the file may end
    with a newline.
    """
    path = str(path)
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file") from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()  # trailing newline at end of file (or an empty file)
    predictions, labels = [], []
    for lineno, line in enumerate(lines, start=1):
        predict, label = _parse_line(path, lineno, line)
        predictions.append(predict)
        labels.append(label)
    return predictions, labels


def score_file(path: str) -> dict[str, float]:
    """Score a ``generated_predictions.txt``; adds ``"samples"`` (the line count)."""
    predictions, labels = read_predictions(path)
    if not predictions:
        raise ValueError(f"{path}: no samples to score (empty file)")
    scores: dict[str, Any] = score_corpus(predictions, labels)
    scores["samples"] = len(predictions)
    return scores
