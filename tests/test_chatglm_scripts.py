"""The original ChatGLM-6B / ChatGLM2-6B / ChatGLM3-6B folders through the unchanged ptuning/, lora/ and finetune/
scripts.

Each tiny golden model of ../shared/golden (original config.json and state-dict keys) is put in a folder
with its real tokenizer files, as a downloaded THUDM folder would be, and the shell scripts are pointed
at it with MODEL=...: train a few steps, evaluate, then reload the checkpoint with glmtune.serve.tuned and
check it answers as evaluate.sh did. P-Tuning checkpoints also carry the ancestors' pytorch_model.bin,
which alone (their format) must give the same answers.
"""

import json
import shutil
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import REPO, TOY_DEV, TOY_TRAIN, chatglm_folder, needs_shared
from test_scripts import bash

pytestmark = [
    pytest.mark.slow,
    needs_shared,
]

TRAIN_ROWS, TEST_ROWS = 16, 6


def head(path, rows: int, out):
    with open(path, encoding="utf-8") as f:
        out.write_text("".join(f.readline() for _ in range(rows)), encoding="utf-8")
    return str(out)


VERSIONS, METHODS = ["v1", "v2", "v3"], ["ptuning", "lora", "finetune"]


def predictions(folder) -> list:
    lines = (folder / "generated_predictions.txt").read_text(encoding="utf-8").splitlines()
    return [json.loads(line)["predict"] for line in lines]


def train_and_evaluate(version: str, method: str, folder) -> None:
    """train.sh then evaluate.sh on the original folder, into ``folder``/train and ``folder``/eval."""
    model = chatglm_folder(version, folder / "model")
    test_file = head(TOY_DEV, TEST_ROWS, folder / "test.json")
    common = dict(MODEL=model, MAX_SOURCE_LENGTH="32", MAX_TARGET_LENGTH="8", PRE_SEQ_LEN="4", OMP_NUM_THREADS="1")
    bash(
        f"{method}/train.sh",
        cwd=REPO,
        **common,
        TRAIN_FILE=head(TOY_TRAIN, TRAIN_ROWS, folder / "train.json"),
        DEV_FILE=test_file,
        BATCH_SIZE="4",
        MAX_STEPS="3",
        SAVE_STEPS="3",
        OUTPUT_DIR=str(folder / "train"),
    )
    bash(
        f"{method}/evaluate.sh",
        cwd=REPO,
        **common,
        TEST_FILE=test_file,
        CHECKPOINT=str(folder / "train"),
        OUTPUT_DIR=str(folder / "eval"),
    )


@pytest.fixture(scope="module")
def script_runs(tmp_path_factory) -> dict:
    """(version, method) -> (its folder, the failure of its scripts or None). The 18 script runs go two at a time
    (CI has two cores, and most of a run is Python starting and importing)."""
    runs = {(v, m): tmp_path_factory.mktemp(f"{m}-{v}") for v in VERSIONS for m in METHODS}

    def attempt(key):
        try:
            train_and_evaluate(*key, runs[key])
        except AssertionError as error:
            return str(error)
        return None

    with ThreadPoolExecutor(max_workers=2) as pool:
        failures = dict(zip(runs, pool.map(attempt, runs)))
    return {key: (runs[key], failures[key]) for key in runs}


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("method", METHODS)
def test_original_folder_trains_evaluates_and_reloads(version, method, script_runs):
    from glmtune.serve.tuned import load_tuned

    tmp_path, failure = script_runs[version, method]
    assert failure is None, failure
    model, test_file = str(tmp_path / "model"), str(tmp_path / "test.json")
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
