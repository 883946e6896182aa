"""scripts/benchmark.py on a 2-layer model (CPU): every row asked for is measured, in order, and reported."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import SHARED, needs_shared

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_tiny_benchmark_measures_both_sides_of_each_row(tmp_path):
    rows = "lora-bf16-recipe,generate,pt-bf16-recipe"
    command = [
        sys.executable,
        str(ROOT / "scripts" / "benchmark.py"),
        "--tiny",
        "--model",
        str(tmp_path / "model"),
        "--scratch",
        str(tmp_path / "scratch"),
        "--rows",
        rows,
        "--warmup",
        "1",
        "--steps",
        "2",
        "--prompts",
        "6",
        "--eval_batch",
        "4",
        "--single_prompts",
        "2",
        "--json",
        str(tmp_path / "rows.json"),
    ]
    out = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    results = [json.loads(line) for line in (tmp_path / "rows.json").read_text().splitlines()]
    assert [(r["row"], r["impl"]) for r in results] == [
        ("lora-bf16-recipe", "glmtune"),
        ("lora-bf16-recipe", "naive"),
        ("generate", "base dynamic"),
        ("generate", "base static"),
        ("generate", "ptuning dynamic"),
        ("generate", "ptuning static"),
        ("generate", "one at a time"),
        ("generate", "lora dynamic"),
        ("generate", "lora static"),
        ("pt-bf16-recipe", "glmtune"),
        ("pt-bf16-recipe", "naive"),
    ]
    for r in results:
        assert r["tokens_per_s"] > 0 and r["samples_per_s"] > 0
    training = [r for r in results if r["row"] != "generate"]
    for glmtune, naive in zip(training[::2], training[1::2]):
        # the same samples in the same order, the same initialisation: the mean losses agree (float32 on CPU)
        assert glmtune["loss"] == pytest.approx(naive["loss"], rel=2e-3)
    first_line = out.stdout.splitlines()[0]  # the device and versions, for the record
    assert first_line.startswith("device: ") and f"torch {torch.__version__}, transformers " in first_line
    table = [line for line in out.stdout.splitlines() if line.startswith("| ")]
    assert len(table) == 1 + len(results)  # header + one line per result
    static = [r for r in results if r["impl"].endswith(" static")]
    # how many static-cache answers equal the dynamic cache's (bf16 rounding flips near-tied tokens of a random model)
    agreement = r"[0-6] same, first token [0-6]/6, common start [0-9.]+ tokens"
    assert len(static) == 3 and all(re.fullmatch(agreement, r["note"]) for r in static)
    assert " 1x128 | " in table[1] and "x |" in table[1]  # glmtune's rows carry their ratio to the naive row
    assert "nan" not in "".join(table)  # figures not measured (memory without CUDA, loss of generation) are left blank


def test_unknown_rows_are_refused(tmp_path):
    command = [
        sys.executable,
        str(ROOT / "scripts" / "benchmark.py"),
        "--tiny",
        "--model",
        str(tmp_path / "model"),
        "--rows",
        "pt-bf16-recipe,pt-fp8-recipe",
    ]
    out = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "unknown rows pt-fp8-recipe" in out.stderr
    assert not (tmp_path / "model").exists()  # refused before building anything


def test_peft_lora_branch_with_compiled_layers_is_refused(tmp_path):
    """Compiled layers switch LoRA to the bf16 branch: the comparison the flag asks for would not happen."""
    command = [sys.executable, str(ROOT / "scripts" / "benchmark.py"), "--tiny", "--model", str(tmp_path / "model"),
               "--rows", "lora-int4-throughput", "--quantized_lora_branch", "peft", "--compile_layers"]  # fmt: skip
    out = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "--quantized_lora_branch peft needs uncompiled layers" in out.stderr
    assert not (tmp_path / "model").exists()


@needs_shared
@pytest.mark.slow
def test_tiny_recipe_section_runs_train_sh_path_and_the_naive_one(tmp_path):
    """--rows recipe on a 2-layer ChatGLM3-shaped folder with the real chatglm3 tokenizer and AdvertiseGen rows:
    per method the naive row first (its peak may be a budget: "naive"), then glmtune's rows, then the table."""
    command = [
        sys.executable, str(ROOT / "scripts" / "benchmark.py"), "--tiny", "--rows", "recipe",
        "--model", str(tmp_path / "model"), "--scratch", str(tmp_path / "scratch"), "--shared", str(SHARED),
        "--precisions", "bf16", "--budgets", "6,naive", "--warmup", "1", "--steps", "1",
        "--json", str(tmp_path / "rows.json"),
    ]  # fmt: skip
    out = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "rows.json").read_text().splitlines()]
    # measured in this order; on a CPU the naive row has no peak GPU memory, so "naive" adds no budget
    assert [(r["row"], r["impl"]) for r in rows] == [
        ("recipe-ptuning-bf16-naive", "naive"),
        ("recipe-ptuning-bf16-6.0gib", "glmtune"),
        ("recipe-lora-bf16-naive", "naive"),
        ("recipe-lora-bf16-6.0gib", "glmtune"),
    ]
    assert all(r["samples_per_s"] > 0 and not r["error"] for r in rows)
    table = [line for line in out.stdout.splitlines() if line.startswith("| ")]
    assert len(table) == 1 + len(rows)
    assert [line.count("x, ") + line.count("x |") > 0 for line in table[1:]] == [True, False, True, False]
