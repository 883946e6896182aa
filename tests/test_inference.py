"""glmtune.inference: one loader for every consumer of a checkpoint; the same answers as evaluation."""

import json

import pytest

from conftest import TOY_DEV
from glmtune.errors import GlmtuneError
from glmtune.inference import checkpoint_method, load_tuned
from test_trainer import PREDICT, run


@pytest.mark.parametrize("method", ["ptuning", "lora"])
def test_batched_and_streamed_answers_match_the_evaluation_predictions(tiny_model_dir, tmp_path, request, method):
    checkpoint = request.getfixturevalue(f"{method}_checkpoint")
    flag = "--ptuning_checkpoint" if method == "ptuning" else "--lora_checkpoint"
    run(method, tiny_model_dir, tmp_path / "eval", *PREDICT, flag, str(checkpoint))
    expected = [json.loads(line)["predict"] for line in (tmp_path / "eval" / "generated_predictions.txt").open()]
    queries = [json.loads(line)["content"] for line in TOY_DEV.open()][: len(expected)]
    tuned = load_tuned(str(tiny_model_dir), str(checkpoint), max_source_length=32)
    assert tuned.method == method
    assert tuned.generate(queries, max_new_tokens=8) == expected
    assert "".join(tuned.stream(queries[0], max_new_tokens=8)).strip() == expected[0]


def test_checkpoint_kinds_and_errors(tmp_path, ptuning_checkpoint, lora_checkpoint, tiny_model_dir):
    assert checkpoint_method(None) == "base"
    assert checkpoint_method(str(ptuning_checkpoint)) == "ptuning"
    assert checkpoint_method(str(lora_checkpoint)) == "lora"
    with pytest.raises(GlmtuneError, match="no such folder"):
        checkpoint_method(str(tmp_path / "missing"))
    with pytest.raises(GlmtuneError, match="neither a P-Tuning v2 checkpoint"):
        checkpoint_method(str(tmp_path))
    with pytest.raises(GlmtuneError, match="not a model folder"):
        load_tuned(str(tmp_path), str(lora_checkpoint))
