"""Shared fixtures: a tiny GLM (2 layers, random weights) and its tokenizer, built once per session."""

import os
from pathlib import Path

import pytest
import torch

from scripts import build_tiny_model as tiny

REPO = Path(__file__).resolve().parents[1]
TOY_TRAIN = REPO / "data" / "adgen-toy" / "train.json"
TOY_DEV = REPO / "data" / "adgen-toy" / "dev.json"
# Test material beside the checkout (also in CI): real data, golden outputs; GLMTUNE_SHARED points elsewhere
# (a GPU machine gets a copy inside the checkout).
SHARED = Path(os.environ.get("GLMTUNE_SHARED", REPO.parent / "shared"))
GOLDEN = SHARED / "golden"
SHARED_MISSING = (
    f"../shared is missing ({SHARED}): the real ChatGLM tokenizers, AdvertiseGen rows and golden "
    "outputs these tests compare against; put it beside the checkout"
)
needs_shared = pytest.mark.skipif(not GOLDEN.is_dir(), reason=SHARED_MISSING)

torch.set_num_threads(min(2, os.cpu_count() or 1))
# Scripts the tests start as subprocesses import this checkout's glmtune, whichever checkout pip installed.
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
# selenium brings trio, whose "hypothesis" entry point fails to load with the hypothesis we pin; nothing
# here uses hypothesis plugins, and loading them crashes pytest's summary (hypothesis imports them then).
os.environ.setdefault("HYPOTHESIS_NO_PLUGINS", "1")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A saved 2-layer GLM with random weights (GQA: 4 heads, 2 key/value heads) and a toy-trained tokenizer."""
    out = tmp_path_factory.mktemp("tiny-glm")
    tiny.build(str(TOY_TRAIN), str(out), steps=0, num_hidden_layers=2)
    return out


@pytest.fixture(scope="session")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture()
def model(tiny_model_dir):
    """A fresh float32 copy of the tiny model for each test (tests may attach adapters to it)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="sdpa").eval()


def write_jsonl(path: Path, lines: list) -> Path:
    """Write raw lines (strings) or records (dicts) as a JSON-lines file."""
    import json

    with open(path, "w", encoding="utf-8") as f:
        for line in lines:
            f.write((line if isinstance(line, str) else json.dumps(line, ensure_ascii=False)) + "\n")
    return path


def _train_checkpoint(tmp_path_factory, model_dir, method: str, flags: list) -> Path:
    from glmtune.cli import main

    out = tmp_path_factory.mktemp(f"{method}-checkpoint")
    main(
        method,
        [
            "--do_train",
            "--train_file",
            str(TOY_TRAIN),
            "--model_name_or_path",
            str(model_dir),
            "--output_dir",
            str(out),
            "--max_train_samples",
            "16",
            "--per_device_train_batch_size",
            "4",
            "--max_steps",
            "2",
            "--max_source_length",
            "32",
            "--max_target_length",
            "16",
            "--report_to",
            "none",
            "--save_strategy",
            "no",
            *flags,
        ],
    )
    return out


@pytest.fixture(scope="session")
def ptuning_checkpoint(tmp_path_factory, tiny_model_dir) -> Path:
    """A P-Tuning v2 checkpoint (pre_seq_len 4) trained 2 steps on the session's tiny model."""
    return _train_checkpoint(
        tmp_path_factory, tiny_model_dir, "ptuning", ["--pre_seq_len", "4", "--learning_rate", "1e-2"]
    )


@pytest.fixture(scope="session")
def lora_checkpoint(tmp_path_factory, tiny_model_dir) -> Path:
    """A LoRA adapter (rank 4, all linear layers) trained 2 steps on the session's tiny model."""
    return _train_checkpoint(tmp_path_factory, tiny_model_dir, "lora", ["--lora_rank", "4", "--learning_rate", "1e-2"])


@pytest.fixture(scope="session")
def llama_model_dir(tmp_path_factory) -> Path:
    """A 2-layer Llama (random weights, untied head) whose tokenizer has 24 added words its embeddings lack."""
    out = tmp_path_factory.mktemp("tiny-llama")
    tiny.build_llama(str(TOY_TRAIN), str(out))
    return out


@pytest.fixture(scope="session")
def llama_adapter(tmp_path_factory, llama_model_dir) -> Path:
    """PromptCBLUE's LLaMA recipe in small: LoRA (rank 4) with --modules_to_save embed_tokens,lm_head, 2 steps."""
    flags = ["--lora_rank", "4", "--learning_rate", "1e-2", "--modules_to_save", "embed_tokens,lm_head"]
    return _train_checkpoint(tmp_path_factory, llama_model_dir, "lora", flags)


@pytest.fixture(scope="session")
def demo_model_dir() -> Path:
    """The embedded default model (models/tiny-glm, pretrained on the toy text: its answers are readable).
    Built by scripts/ensure_model.sh when missing (about 35 s), as the shell scripts do."""
    import subprocess

    subprocess.run(["bash", "scripts/ensure_model.sh", "models/tiny-glm"], cwd=REPO, check=True)
    return REPO / "models" / "tiny-glm"


@pytest.fixture(scope="session")
def demo_ptuning_checkpoint(tmp_path_factory, demo_model_dir) -> Path:
    """A P-Tuning v2 checkpoint (pre_seq_len 4) trained 2 steps on the embedded default model."""
    return _train_checkpoint(
        tmp_path_factory, demo_model_dir, "ptuning", ["--pre_seq_len", "4", "--learning_rate", "1e-2"]
    )


# ----------------------------------------------------------------------------- original ChatGLM folders

# version -> (golden config folder, golden weights folder, tokenizer folder); v3 reuses v2's weights (golden README)
CHATGLM_FOLDERS = {
    "v1": ("chatglm-v1", "chatglm-v1", "chatglm-6b"),
    "v2": ("chatglm-v2", "chatglm-v2", "chatglm2-6b"),
    "v3": ("chatglm-v3", "chatglm-v2", "chatglm3-6b"),
}


def chatglm_folder(version: str, out: Path) -> str:
    """A tiny golden ChatGLM model as THUDM ships a folder: original config.json, weights under the original
    keys, the real tokenizer files (from ../shared; nothing is copied into the repository)."""
    import shutil

    config_dir, weights_dir, tokenizer_dir = CHATGLM_FOLDERS[version]
    out.mkdir()
    shutil.copy(GOLDEN / config_dir / "config.json", out / "config.json")
    shutil.copy(GOLDEN / weights_dir / "model.safetensors", out / "model.safetensors")
    for file in (SHARED / "tokenizers" / tokenizer_dir).iterdir():
        shutil.copy(file, out / file.name)
    return str(out)


def conversation_row(query: str, answer: str, history=(), system: str = "", where: str = "test:1") -> dict:
    """A row of glmtune.records.FEATURES for one query and its answer after [query, answer] history pairs."""
    messages = []
    for turn in [*history, (query, answer)]:
        messages += [
            {"role": "user", "content": turn[0], "metadata": ""},
            {"role": "assistant", "content": turn[1], "metadata": ""},
        ]
    return {"system": system, "tools": "", "messages": messages, "every_reply": False, "where": where, "keep": ""}


def encoder_batch(rows: list) -> dict:
    """rows: (query, answer) or (query, answer, history) tuples, or FEATURES rows -> a batch for glmtune's Encoder."""
    rows = [row if isinstance(row, dict) else conversation_row(*row) for row in rows]
    return {name: [row[name] for row in rows] for name in rows[0]}
