"""Tests for glmtune.metrics and the evaluate/score.py CLI (fast: no model, no GPU)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jieba
import numpy as np
import pytest
from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

from glmtune.metrics import (
    METRIC_KEYS,
    ComputeMetrics,
    decode_texts,
    read_predictions,
    score_corpus,
    score_file,
    score_pair,
)

REPO = Path(__file__).resolve().parent.parent
SCORE_PY = REPO / "evaluate" / "score.py"
ZEROS = {key: 0.0 for key in METRIC_KEYS}


# --- score_pair -------------------------------------------------------------


def test_identical_strings_score_100():
    # 7 characters, so all four character n-gram orders exist and BLEU is exactly 1.
    assert score_pair("我爱北京天安门", "我爱北京天安门") == {key: 100.0 for key in METRIC_KEYS}


def test_disjoint_strings_score_0():
    # No word and no character in common.
    assert score_pair("今日晴朗", "我爱北京天安门") == ZEROS


@pytest.mark.parametrize(
    "prediction, label",
    [("", "我爱北京天安门"), ("   \n", "我爱北京天安门"), ("我爱北京", ""), ("", "")],
)
def test_empty_side_scores_0_without_exception(prediction, label):
    assert score_pair(prediction, label) == ZEROS


def test_rouge_by_hand_from_jieba_tokens():
    prediction, label = "我爱上海", "我爱北京天安门"
    assert list(jieba.cut(prediction)) == ["我", "爱", "上海"]
    assert list(jieba.cut(label)) == ["我", "爱", "北京", "天安门"]
    scores = score_pair(prediction, label)
    # ROUGE-1: overlap {我, 爱} = 2 -> P = 2/3, R = 2/4, F = 2PR/(P+R) = 4/7.
    p, r = 2 / 3, 2 / 4
    assert scores["rouge-1"] == pytest.approx(round(2 * p * r / (p + r) * 100, 4), abs=1e-4)
    assert scores["rouge-1"] == 57.1429
    # ROUGE-2: hyp bigrams {我爱, 爱上海}, ref {我爱, 爱北京, 北京天安门}: P = 1/2, R = 1/3, F = 0.4.
    assert scores["rouge-2"] == 40.0
    # ROUGE-L: LCS = 我 爱 (2 words) -> same P, R as ROUGE-1.
    assert scores["rouge-l"] == 57.1429


def test_bleu_matches_direct_nltk_call_on_characters():
    prediction, label = "这件连衣裙很显瘦，适合夏天穿", "这款连衣裙版型显瘦，夏天穿着清爽"
    direct = sentence_bleu([list(label)], list(prediction), smoothing_function=SmoothingFunction().method3)
    assert 0 < direct < 1
    assert score_pair(prediction, label)["bleu-4"] == round(direct * 100, 4)


# --- score_corpus -----------------------------------------------------------


def test_score_corpus_is_the_arithmetic_mean():
    preds = ["我爱北京天安门", "", "我爱上海"]
    labels = ["我爱北京天安门", "我爱北京天安门", "我爱北京天安门"]
    scores = score_corpus(preds, labels)
    assert set(scores) == set(METRIC_KEYS)
    assert all(type(v) is float for v in scores.values())
    assert scores["rouge-1"] == pytest.approx((100.0 + 0.0 + 57.1429) / 3)
    assert scores["rouge-2"] == pytest.approx((100.0 + 0.0 + 40.0) / 3)
    bleu3 = score_pair("我爱上海", "我爱北京天安门")["bleu-4"]
    assert scores["bleu-4"] == pytest.approx((100.0 + 0.0 + bleu3) / 3)


def test_score_corpus_rejects_mismatched_or_empty_input():
    with pytest.raises(ValueError, match="2 predictions but 1 labels"):
        score_corpus(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="no samples to score"):
        score_corpus([], [])


# --- ComputeMetrics / decode_texts ------------------------------------------


class CharTokenizer:
    """Minimal stand-in for a HF tokenizer: id -> character, id 0 is <pad>.

    Like HF fast tokenizers, batch_decode refuses negative ids.
    """

    pad_token_id = 0
    vocab = {0: "<pad>", 1: "我", 2: "爱", 3: "北", 4: "京", 5: "上", 6: "海", 7: " "}

    def batch_decode(self, sequences, skip_special_tokens=False):
        texts = []
        for seq in sequences:
            if any(i < 0 for i in seq):
                raise OverflowError("out of range integral type conversion attempted")
            texts.append("".join(self.vocab[i] for i in seq if not (skip_special_tokens and i == self.pad_token_id)))
        return texts


class EvalPredictionLike:
    def __init__(self, predictions, label_ids):
        self.predictions = predictions
        self.label_ids = label_ids


def test_decode_texts_replaces_negative_ids_and_strips():
    ids = np.array([[7, 1, 2, 3, 4, -100], [1, 2, 5, 6, 7, -100]])
    assert decode_texts(CharTokenizer(), ids) == ["我爱北京", "我爱上海"]
    # ragged list-of-lists input works too
    assert decode_texts(CharTokenizer(), [[1, 2], [-100, 5, 6]]) == ["我爱", "上海"]


def test_compute_metrics_handles_minus_100_in_preds_and_labels():
    preds = np.array([[1, 2, 3, 4, -100, -100], [1, 2, 5, 6, 0, -100]])
    labels = np.array([[1, 2, 3, 4, -100, -100], [1, 2, 3, 4, -100, -100]])
    expected = score_corpus(["我爱北京", "我爱上海"], ["我爱北京", "我爱北京"])
    compute = ComputeMetrics(CharTokenizer())
    # EvalPrediction-like object, predictions wrapped in a tuple as generate() may return
    assert compute(EvalPredictionLike((preds, None), labels)) == expected
    # plain (preds, labels) tuple
    assert compute((preds, labels)) == expected
    assert expected["rouge-1"] == pytest.approx((100.0 + score_pair("我爱上海", "我爱北京")["rouge-1"]) / 2)


# --- read_predictions / score_file ------------------------------------------


def write_lines(path, lines, trailing_newline=True):
    path.write_text("\n".join(lines) + ("\n" if trailing_newline else ""), encoding="utf-8")
    return path


def line(label, predict):
    return json.dumps({"labels": label, "predict": predict}, ensure_ascii=False)


GOOD_LINES = [
    line("我爱北京天安门", "我爱北京天安门"),
    line("我爱北京天安门", "我爱上海"),
    line("我爱北京天安门", ""),
]


def test_read_predictions_and_score_file(tmp_path):
    path = write_lines(tmp_path / "generated_predictions.txt", GOOD_LINES)
    preds, labels = read_predictions(path)
    assert preds == ["我爱北京天安门", "我爱上海", ""]
    assert labels == ["我爱北京天安门"] * 3
    scores = score_file(path)
    assert scores["samples"] == 3
    assert scores["rouge-1"] == pytest.approx((100.0 + 57.1429 + 0.0) / 3)
    # no trailing newline is fine as well
    path2 = write_lines(tmp_path / "b.txt", GOOD_LINES, trailing_newline=False)
    assert read_predictions(path2) == (preds, labels)


@pytest.mark.parametrize(
    "second_line, message",
    [
        ('{"labels": "a", "predict": ', r":2: invalid JSON"),
        ('{"labels": "a"}', r":2: missing key 'predict'"),
        ('{"labels": 5, "predict": "a"}', r":2: field 'labels' must be a string"),
        ('["a", "b"]', r":2: expected a JSON object"),
        ("", r":2: blank line"),
    ],
)
def test_read_predictions_errors_name_the_line(tmp_path, second_line, message):
    path = write_lines(tmp_path / "p.txt", [GOOD_LINES[0], second_line, GOOD_LINES[1]])
    with pytest.raises(ValueError, match=message):
        read_predictions(path)


def test_read_predictions_missing_file(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        read_predictions(missing)


def test_score_file_rejects_empty_file(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_text("", encoding="utf-8")
    with pytest.raises(ValueError, match="no samples"):
        score_file(path)


# --- CLI --------------------------------------------------------------------


def run_cli(*args):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # score.py must find glmtune itself
    return subprocess.run(
        [sys.executable, str(SCORE_PY), *map(str, args)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_scores_file_and_writes_json(tmp_path):
    path = write_lines(tmp_path / "generated_predictions.txt", GOOD_LINES)
    out = tmp_path / "scores.json"
    result = run_cli(path, "--output", out)
    assert result.returncode == 0, result.stderr
    expected = score_file(path)
    for key in METRIC_KEYS:
        assert key in result.stdout
        assert f"{expected[key]:.4f}" in result.stdout
    assert "samples" in result.stdout
    assert json.loads(out.read_text(encoding="utf-8")) == expected
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".score-")] == []


def test_cli_malformed_file_exits_2_with_one_line_error(tmp_path):
    path = write_lines(tmp_path / "bad.txt", [GOOD_LINES[0], "{not json", GOOD_LINES[1]])
    result = run_cli(path)
    assert result.returncode == 2
    assert result.stderr.startswith("error: ")
    assert f"{path}:2:" in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1


def test_cli_puts_several_files_side_by_side(tmp_path):
    base = write_lines(tmp_path / "base.txt", [line("我爱北京天安门", "今日晴朗")])
    tuned = write_lines(tmp_path / "tuned.txt", GOOD_LINES)
    out = tmp_path / "scores.json"
    result = run_cli(base, tuned, "--labels", "untuned base", "tuned", "--output", out)
    assert result.returncode == 0, result.stderr
    expected = {"untuned base": score_file(base), "tuned": score_file(tuned)}
    rows = result.stdout.splitlines()
    assert rows[0].split() == ["metric", "untuned", "base", "tuned"]
    for key, row in zip(METRIC_KEYS, rows[1:]):
        assert row.split() == [key, f"{expected['untuned base'][key]:.4f}", f"{expected['tuned'][key]:.4f}"]
    assert json.loads(out.read_text(encoding="utf-8")) == expected


def test_cli_wants_one_label_per_file(tmp_path):
    path = write_lines(tmp_path / "p.txt", GOOD_LINES)
    result = run_cli(path, path, "--labels", "only one")
    assert (result.returncode, result.stderr) == (2, "error: --labels: 1 given for 2 paths (one per path)\n")
