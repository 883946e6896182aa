"""The original ChatGLM-6B / ChatGLM2-6B / ChatGLM3-6B folders through the unchanged ptuning/, lora/ and finetune/
scripts.

Each tiny golden model of ../shared/golden (original config.json and state-dict keys) is put in a folder
with its real tokenizer files, as a downloaded THUDM folder would be, and the shell scripts are pointed
at it with MODEL=...: train a few steps, evaluate, then reload the checkpoint with glmtune.serve.tuned and
check it answers as evaluate.sh did. P-Tuning checkpoints also carry the ancestors' pytorch_model.bin,
which alone (their format) must give the same answers.
"""

import json
import os
import shutil
import subprocess

import pytest
from conftest import REPO, TOY_DEV, TOY_TRAIN, chatglm_folder, needs_shared

pytestmark = [
    pytest.mark.slow,
    needs_shared,
]

TRAIN_ROWS, TEST_ROWS = 16, 6


def head(path, rows: int, out):
    with open(path, encoding="utf-8") as f:
        out.write_text("".join(f.readline() for _ in range(rows)), encoding="utf-8")
    return str(out)


def bash(script: str, **env) -> None:
    result = subprocess.run(["bash", script], cwd=REPO, env={**os.environ, **env}, capture_output=True, text=True)
    assert result.returncode == 0, f"{script} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"


def predictions(folder) -> list:
    lines = (folder / "generated_predictions.txt").read_text(encoding="utf-8").splitlines()
    return [json.loads(line)["predict"] for line in lines]


@pytest.mark.parametrize("version", ["v1", "v2", "v3"])
@pytest.mark.parametrize("method", ["ptuning", "lora", "finetune"])
def test_original_folder_trains_evaluates_and_reloads(version, method, tmp_path):
    from glmtune.serve.tuned import load_tuned

    model = chatglm_folder(version, tmp_path / "model")
    test_file = head(TOY_DEV, TEST_ROWS, tmp_path / "test.json")
    common = dict(MODEL=model, MAX_SOURCE_LENGTH="32", MAX_TARGET_LENGTH="8", PRE_SEQ_LEN="4")
    bash(
        f"{method}/train.sh",
        **common,
        TRAIN_FILE=head(TOY_TRAIN, TRAIN_ROWS, tmp_path / "train.json"),
        DEV_FILE=test_file,
        BATCH_SIZE="4",
        MAX_STEPS="3",
        SAVE_STEPS="3",
        OUTPUT_DIR=str(tmp_path / "train"),
    )
    bash(
        f"{method}/evaluate.sh",
        **common,
        TEST_FILE=test_file,
        CHECKPOINT=str(tmp_path / "train"),
        OUTPUT_DIR=str(tmp_path / "eval"),
    )
    evaluated = predictions(tmp_path / "eval")
    assert len(evaluated) == TEST_ROWS
    assert set(json.loads((tmp_path / "eval" / "predict_results.json").read_text())) >= {
        "predict_bleu-4",
        "predict_rouge-1",
        "predict_rouge-2",
        "predict_rouge-l",
    }

    queries = [json.loads(line)["content"] for line in open(test_file, encoding="utf-8")]
    if method == "finetune":  # the trained folder is the model
        tuned = load_tuned(str(tmp_path / "train"), torch_dtype="float32", max_source_length=32)
    else:
        tuned = load_tuned(model, str(tmp_path / "train"), torch_dtype="float32", max_source_length=32)
    assert tuned.generate(queries, max_new_tokens=8) == evaluated
    if method == "ptuning":  # the ancestors' format alone: pytorch_model.bin with transformer.prefix_encoder.*
        original = tmp_path / "original-format"
        original.mkdir()
        shutil.copy(tmp_path / "train" / "pytorch_model.bin", original / "pytorch_model.bin")
        tuned = load_tuned(model, str(original), torch_dtype="float32", max_source_length=32)
        assert tuned.generate(queries, max_new_tokens=8) == evaluated
