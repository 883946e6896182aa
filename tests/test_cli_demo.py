"""scripts/cli_demo.py: a terminal chat whose answers are exactly the tuned model's (greedy) answers."""

import importlib.util
import io
import os
import re
import subprocess
import sys

import pytest
from conftest import REPO

from glmtune.serve.tuned import load_tuned

SCRIPT = REPO / "scripts" / "cli_demo.py"
QUERIES = ["类型#裙*颜色#白色", "第二轮", "类型#上衣"]
STDIN = f"{QUERIES[0]}\n{QUERIES[1]}\nclear\n{QUERIES[2]}\nexit\n"
MAX_NEW_TOKENS = 8


def start(*flags) -> subprocess.Popen:
    """The demo as a user runs it (no install), its stdin piped."""
    return subprocess.Popen(
        [sys.executable, str(SCRIPT), *map(str, flags)],
        cwd=REPO,
        text=True,
        encoding="utf-8",
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONIOENCODING": "utf-8", "OMP_NUM_THREADS": "1"},
    )


def answers(stdout: str) -> list:
    return [answer.strip() for answer in re.findall(r"ChatGLM：(.*?)\n\n用户：", stdout, re.S)]


def test_chat_answers_match_the_tuned_model_with_history_and_clear(tiny_model_dir, ptuning_checkpoint, lora_checkpoint):
    checkpoints = {"ptuning": ptuning_checkpoint, "lora": lora_checkpoint}
    # Both demos run at once (most of their time is importing torch and transformers).
    processes = {
        method: start(
            "--model_name_or_path", tiny_model_dir, "--checkpoint", checkpoint, "--max_new_tokens", MAX_NEW_TOKENS
        )
        for method, checkpoint in checkpoints.items()
    }
    outputs = {
        method: process.communicate(STDIN, timeout=300) + (process.returncode,) for method, process in processes.items()
    }
    for method, checkpoint in checkpoints.items():
        stdout, stderr, returncode = outputs[method]
        assert returncode == 0, stderr[-3000:]
        assert "Traceback" not in stderr
        welcome = stdout.splitlines()[0]
        assert (
            str(tiny_model_dir) in welcome and str(checkpoint) in welcome and "clear" in welcome and "stop" in welcome
        )
        assert {"ptuning": "P-Tuning v2", "lora": "LoRA"}[method] in welcome
        assert stdout.count("ChatGLM：") == 3
        got = answers(stdout)
        assert len(got) == 3

        tuned = load_tuned(str(tiny_model_dir), str(checkpoint))
        assert tuned.method == method
        first = tuned.generate([QUERIES[0]], max_new_tokens=MAX_NEW_TOKENS)[0]
        assert got[0] == first
        # the second round sees the first in the model's own prompt format; "clear" forgets both
        assert got[1] == tuned.generate([QUERIES[1]], [[[QUERIES[0], first]]], max_new_tokens=MAX_NEW_TOKENS)[0]
        assert got[2] == tuned.generate([QUERIES[2]], max_new_tokens=MAX_NEW_TOKENS)[0]


def test_missing_checkpoint_is_one_error_line_and_exit_2(tiny_model_dir, tmp_path, capsys, monkeypatch):
    # in-process (the demo's main, as the subprocess would run it) to spare another 15 s of imports
    spec = importlib.util.spec_from_file_location("cli_demo", SCRIPT)
    cli_demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli_demo)
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\nexit\n"))
    with pytest.raises(SystemExit) as exit_info:
        cli_demo.main(["--model_name_or_path", str(tiny_model_dir), "--checkpoint", str(tmp_path / "missing")])
    assert exit_info.value.code == 2
    stdout, stderr = capsys.readouterr()
    assert stderr.splitlines() == [f"error: --checkpoint {tmp_path / 'missing'}: no such folder"]
    assert "ChatGLM：" not in stdout
