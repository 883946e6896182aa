"""scripts/benchmark_finetune.py on a 2-layer ChatGLM3-shaped model (CPU, no DeepSpeed): each run adds its row to
the JSON file and prints the table of all rows; the saved folder holds every parameter; a configuration glmtune
refuses ends with its error lines, not a traceback."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import REPO, SHARED, needs_shared

pytestmark = [pytest.mark.slow, needs_shared]
SCRIPT = REPO / "scripts" / "benchmark_finetune.py"


def benchmark(tmp_path, *flags):
    command = [sys.executable, str(SCRIPT), "--tiny", "--model", str(tmp_path / "model"), "--shared", str(SHARED),
               "--scratch", str(tmp_path / "scratch"), "--warmup", "1", "--steps", "2", *flags]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, timeout=600)


def test_rows_accumulate_into_one_table(tmp_path):
    rows = tmp_path / "rows.json"
    for optim in ("adamw_torch", "paged_adamw_8bit"):
        out = benchmark(tmp_path, "--deepspeed", "none", "--optim", optim, "--save", "--json", str(rows))
        assert out.returncode == 0, out.stderr[-3000:]
    measured = [json.loads(line) for line in rows.read_text().splitlines()]
    assert [(r["deepspeed"], r["optim"], r["layers"], r["batch"]) for r in measured] == [
        ("none", "adamw_torch", 2, "4 x 1"),
        ("none", "paged_adamw_8bit", 2, "4 x 1"),
    ]
    for r in measured:
        assert r["samples_per_s"] > 0 and r["peak_host_gib"] > 0 and r["loss"] > 0
        assert r["peak_gpu_gib"] is None  # no CUDA here: left blank, not zero
        assert r["saved_parameters_b"] == r["parameters_b"] > 0  # the saved folder holds every parameter
    table = [line for line in out.stdout.splitlines() if line.startswith("| ")]
    assert len(table) == 1 + len(measured)  # header + one line per row, the earlier run's included
    assert out.stdout.splitlines()[0].startswith("device: CPU; torch ")


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU with DeepSpeed the default configuration runs")
def test_a_refused_configuration_ends_with_its_error(tmp_path):
    """The default, ZeRO-3 with CPU offload, needs DeepSpeed and a CUDA GPU: here one of them is missing."""
    out = benchmark(tmp_path)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert errors and all("--deepspeed" in line for line in errors), out.stderr[-2000:]
