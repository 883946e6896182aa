"""The shipped shell scripts, unedited, end to end on the embedded default (tiny GLM + toy data).

Slow (a few minutes on 2 cores): builds models/tiny-glm if missing, trains each method with the
scripts' own settings, and checks that tuning clearly beats the untuned base on the toy dev set.
"""

import json
import os
import subprocess

import pytest
from conftest import REPO

pytestmark = pytest.mark.slow
DEV_ROWS = sum(1 for _ in open(REPO / "data" / "adgen-toy" / "dev.json", encoding="utf-8"))
# Tuning must clearly beat the untuned base (an adapter that is not trained, saved or loaded gives +0).
# The gains move with the library versions and the CPU's vector unit (the tiny base is built and trained
# on the machine): measured on 2 cores, BLEU-4 / Rouge-L, 2026-11-23: +8.1 / +11.6 (P-Tuning v2), +7.1 / +8.1
# (LoRA); 2026-11-30, the same code on a fresh setup: +7.2 / +9.2 (P-Tuning v2), +5.2 / +5.0 (LoRA), and with
# ATEN_CPU_CAPABILITY=avx2 instead of AVX-512 LoRA's tuned Rouge-L moved from 17.97 to 17.66.
MARGIN = {"predict_bleu-4": 3.0, "predict_rouge-l": 3.0}


def bash(script: str, **env) -> None:
    result = subprocess.run(["bash", script], cwd=REPO, env={**os.environ, **env}, capture_output=True, text=True)
    assert result.returncode == 0, f"{script} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"


def scores(folder) -> dict:
    lines = (folder / "generated_predictions.txt").read_text(encoding="utf-8").splitlines()
    assert len(lines) == DEV_ROWS  # one prediction per input row
    assert all({"labels", "predict"} == json.loads(line).keys() for line in lines)
    return json.loads((folder / "predict_results.json").read_text())


@pytest.fixture(scope="module")
def base_scores(tmp_path_factory):
    out = tmp_path_factory.mktemp("base")
    bash("ptuning/evaluate.sh", CHECKPOINT="none", OUTPUT_DIR=str(out))
    return scores(out)


@pytest.mark.parametrize("method", ["ptuning", "lora"])
def test_train_then_evaluate_beats_the_untuned_base(method, tmp_path, base_scores):
    bash(f"{method}/train.sh", OUTPUT_DIR=str(tmp_path / "train"))
    assert (tmp_path / "train" / "checkpoint-200").is_dir()
    assert list((tmp_path / "train" / "runs").iterdir())  # TensorBoard logs
    bash(f"{method}/evaluate.sh", CHECKPOINT=str(tmp_path / "train"), OUTPUT_DIR=str(tmp_path / "eval"))
    tuned = scores(tmp_path / "eval")
    print(f"{method}: tuned {tuned} vs base {base_scores}")
    for metric, margin in MARGIN.items():
        assert tuned[metric] >= base_scores[metric] + margin, (metric, tuned[metric], base_scores[metric])
