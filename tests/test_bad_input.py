"""Bad-input catalogue: every case runs the whole entry point (glmtune.cli.main) on a real file or flag
combination and must end with clear ``error:`` lines on stderr (naming the file + line + field, or the
flag), exit status 2, no traceback, and nothing written: --output_dir is not created and no stray file
appears next to the inputs."""

import importlib.util
import json
import logging
import os
import shutil

import pytest
import torch
from conftest import REPO, TOY_DEV, TOY_TRAIN, write_jsonl

from glmtune.cli import main

GOOD = {"content": "类型#裙*颜色#红色", "summary": "一条红色的裙子。"}
ALPACA = {"instruction": "描述这条裙子", "input": "类型#裙*颜色#红色", "output": "一条红色的裙子。"}


def _conversation(*roles, key="conversations") -> dict:
    return {key: [{"role": role, "content": f"{role} 的话"} for role in roles]}


CONVERSATION = _conversation("user", "assistant")
ADALORA = ["--lora_variant", "adalora", "--max_steps", 10]
SMALL = ["--max_source_length", "16", "--max_target_length", "8", "--max_new_tokens", "4", "--report_to", "none"]
DEEPSPEED = REPO / "scripts" / "deepspeed"
needs_deepspeed = pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None,
    reason="DeepSpeed is not installed (requirements-deepspeed.txt); TrainingArguments load it for --deepspeed",
)


class Case:
    """What one case needs: its own folder, the session's tiny model and checkpoints, an --output_dir."""

    def __init__(self, tmp_path, request):
        self.tmp = tmp_path
        self.request = request
        self.out = tmp_path / "out"

    @property
    def model(self):
        return self.request.getfixturevalue("tiny_model_dir")

    @property
    def ptuning_checkpoint(self):
        return self.request.getfixturevalue("ptuning_checkpoint")

    @property
    def lora_checkpoint(self):
        return self.request.getfixturevalue("lora_checkpoint")

    @property
    def llama(self):
        """A Llama whose tokenizer has 24 tokens more than its embeddings (tests/conftest.py)."""
        return self.request.getfixturevalue("llama_model_dir")

    @property
    def llama_adapter(self):
        return self.request.getfixturevalue("llama_adapter")

    def jsonl(self, name, lines):
        return write_jsonl(self.tmp / name, lines)

    def file(self, name, content):
        path = self.tmp / name
        (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
        return path

    def train(self, method, train_file, *extra, model=None):
        argv = [
            "--do_train",
            "--train_file",
            str(train_file),
            "--model_name_or_path",
            str(model or self.model),
            "--output_dir",
            str(self.out),
            *SMALL,
        ]
        if method == "ptuning" and "--pre_seq_len" not in extra:
            argv += ["--pre_seq_len", "4"]
        return method, argv + [str(x) for x in extra]

    def predict(self, method, test_file, *extra, checkpoint=None, model=None):
        if checkpoint is None:
            checkpoint = self.ptuning_checkpoint if method == "ptuning" else self.lora_checkpoint
        argv = [
            "--do_predict",
            "--test_file",
            str(test_file),
            "--model_name_or_path",
            str(model or self.model),
            "--output_dir",
            str(self.out),
            f"--{method}_checkpoint",
            str(checkpoint),
            *SMALL,
        ]
        return method, argv + [str(x) for x in extra]

    def folder(self, name):
        (self.tmp / name).mkdir()
        return self.tmp / name

    def copy(self, source, name):
        return shutil.copytree(source, self.tmp / name)


def _files(root):
    return sorted(os.path.relpath(os.path.join(d, n), root) for d, dirs, names in os.walk(root) for n in dirs + names)


# Each case: (id, setup(case) -> ((method, argv), [needles for each expected error line]), *marks).
CASES = [
    # ---- data files: the message names the file, the line (or element) and the field
    (
        "malformed-json-line",
        lambda c: (
            c.train("ptuning", p := c.jsonl("bad.jsonl", [GOOD, '{"content": "x", "summary": }'])),
            [[f"{p}:2:", "invalid JSON"]],
        ),
    ),
    (
        "json-array-non-object-element",
        lambda c: (
            c.train("lora", p := c.file("array.json", json.dumps([GOOD, ["not", "an", "object"]]))),
            [[str(p), "element 1", "expected a JSON object, got list"]],
        ),
    ),
    (
        "missing-prompt-column",
        lambda c: (
            c.train("ptuning", p := c.jsonl("cols.jsonl", [GOOD, {"title": "t", "summary": "s"}])),
            [[f"{p}:2:", "'content'", "--prompt_column", "fields present: summary, title"]],
        ),
    ),
    (
        "missing-response-column",
        lambda c: (
            c.predict("lora", p := c.jsonl("cols.jsonl", [{"content": "c", "answer": "a"}])),
            [[f"{p}:1:", "'summary'", "--response_column"]],
        ),
    ),
    (
        "null-prompt-in-every-row",
        lambda c: (
            c.train("ptuning", p := c.jsonl("nulls.jsonl", [{"content": None, "summary": "s"}] * 3)),
            [[str(p), "every row has an empty prompt or response"]],
        ),
    ),
    (
        "empty-strings-in-every-row",
        lambda c: (
            c.train(
                "lora", p := c.jsonl("empty.jsonl", [{"content": "", "summary": "s"}, {"content": "c", "summary": ""}])
            ),
            [[str(p), "every row has an empty prompt or response"]],
        ),
    ),
    (
        "number-value",
        lambda c: (
            c.train("ptuning", p := c.jsonl("num.jsonl", [GOOD, GOOD, {"content": 42, "summary": "s"}])),
            [[f"{p}:3:", "field 'content' must be a string, got int"]],
        ),
    ),
    (
        "list-value",
        lambda c: (
            c.predict("ptuning", p := c.jsonl("list.jsonl", [{"content": "c", "summary": ["a", "b"]}])),
            [[f"{p}:1:", "field 'summary' must be a string, got list"]],
        ),
    ),
    (
        "history-string",
        lambda c: (
            c.train("lora", p := c.jsonl("h.jsonl", [{**GOOD, "history": "q1 a1"}]), "--history_column", "history"),
            [[f"{p}:1:", "field 'history'", "[query, answer] pairs"]],
        ),
    ),
    (
        "history-3-element-pairs",
        lambda c: (
            c.train(
                "ptuning",
                p := c.jsonl("h.jsonl", [GOOD, {**GOOD, "history": [["q", "a", "x"]]}]),
                "--history_column",
                "history",
            ),
            [[f"{p}:2:", "field 'history'", "[query, answer] pairs"]],
        ),
    ),
    (
        "history-non-string-members",
        lambda c: (
            c.predict(
                "lora", p := c.jsonl("h.jsonl", [{**GOOD, "history": [["q", 1]]}]), "--history_column", "history"
            ),
            [[f"{p}:1:", "field 'history'", "[query, answer] pairs"]],
        ),
    ),
    (
        "history-column-typo",  # issue 17: trained without any history, exit 0
        lambda c: (
            c.train(
                "ptuning",
                p := c.jsonl("h.jsonl", [{**GOOD, "history": [["q", "a"]]}, GOOD]),
                "--history_column",
                "histroy",
            ),
            [[str(p), "no record has the field 'histroy' (--history_column)", "content, history, summary"]],
        ),
    ),
    (
        "history-column-typo-in-eval-csv",
        lambda c: (
            c.predict("lora", p := c.file("t.csv", "content,summary,history\nc,s,[]\n"), "--history_column", "hist"),
            [[str(p), "no record has the field 'hist'"]],
        ),
    ),
    (
        "non-utf8-bytes",
        lambda c: (
            c.train(
                "ptuning",
                p := c.file("latin1.jsonl", json.dumps(GOOD).encode() + b'\n{"content": "caf\xe9", "summary": "s"}\n'),
            ),
            [[f"{p}:2:", "not UTF-8"]],
        ),
    ),
    (
        "10MB-line-not-json",
        lambda c: (
            c.train("lora", p := c.file("huge.jsonl", json.dumps(GOOD) + '\n{"content": "' + "a" * 10_000_000 + "\n")),
            [[f"{p}:2:", "invalid JSON"]],
        ),
    ),
    ("empty-file", lambda c: (c.train("ptuning", p := c.file("empty.jsonl", "")), [[str(p), "no records"]])),
    (
        "whitespace-only-file",
        lambda c: (c.predict("lora", p := c.file("blank.json", "  \n\t\n   \n")), [[str(p), "no records"]]),
    ),
    # ---- the data formats (--data_format, or detected from the first record)
    (
        "alpaca-missing-instruction",
        lambda c: (
            c.train(
                "lora", p := c.jsonl("a.jsonl", [ALPACA, {"input": "x", "output": "y"}]), "--data_format", "alpaca"
            ),
            [[f"{p}:2:", "no field 'instruction'", "fields present: input, output"]],
        ),
    ),
    (
        "alpaca-output-not-a-string",
        lambda c: (
            c.train("ptuning", p := c.jsonl("a.jsonl", [ALPACA, {**ALPACA, "output": 3}])),
            [[f"{p}:2:", "field 'output' must be a string, got int"]],
        ),
    ),
    (
        "conversations-not-a-list",
        lambda c: (
            c.train("lora", p := c.jsonl("c.jsonl", [{"conversations": "你好"}]), "--data_format", "conversations"),
            [[f"{p}:1:", "field 'conversations' must be a list of {role, content} messages, got str"]],
        ),
    ),
    (
        "unknown-role",
        lambda c: (
            c.train("ptuning", p := c.jsonl("c.jsonl", [CONVERSATION, _conversation("user", "bot")])),
            [[f"{p}:2:", "field 'conversations[1].role'", "unknown role 'bot'", "roles: system, user, assistant"]],
        ),
    ),
    (
        "assistant-turn-first",
        lambda c: (
            c.predict("lora", p := c.jsonl("m.jsonl", [_conversation("assistant", "user", key="messages")])),
            [[f"{p}:1:", "field 'messages[0].role'", "the first message (after system) must be from the user"]],
        ),
    ),
    (
        "observation-in-chatglm2-prompts",
        lambda c: (
            c.train("lora", p := c.jsonl("c.jsonl", [_conversation("user", "assistant", "observation", "assistant")])),
            [[f"{p}:1:", "role 'observation' (ChatGLM3 tool use) has no place in the chatglm2 prompt format"]],
        ),
    ),
    (
        "csv-row-with-a-missing-field",
        lambda c: (
            c.train("ptuning", p := c.file("t.csv", "content,summary\n类型#裙,裙子。\n类型#裤\n")),
            [[f"{p}:3:", "1 fields, but the header row has 2 (content, summary)"]],
        ),
    ),
    (
        "conversations-in-a-csv-file",
        lambda c: (
            c.train("lora", p := c.file("t.csv", "conversations\n[]\n"), "--data_format", "conversations"),
            [[str(p), "--data_format conversations needs JSON"]],
        ),
    ),
    (
        "keep_columns-naming-an-absent-field",
        lambda c: (
            c.train(
                "lora",
                c.jsonl("train.jsonl", [GOOD]),
                "--do_predict",
                "--test_file",
                p := c.jsonl("test.jsonl", [{**GOOD, "sample_id": 1}, {**GOOD, "task": "x"}]),
                "--keep_columns",
                "sample_id",
            ),
            [[f"{p}:2:", "no field 'sample_id' (--keep_columns)", "fields present: content, summary, task"]],
        ),
    ),
    (
        "data_format-unknown",
        lambda c: (
            c.train("lora", TOY_TRAIN, "--data_format", "sharegpt"),
            [["--data_format must be one of auto, prompt_response, alpaca, conversations, messages", "'sharegpt'"]],
        ),
    ),
    (
        "prompt_column-with-an-alpaca-file",
        lambda c: (
            c.train("lora", p := c.jsonl("a.jsonl", [ALPACA]), "--prompt_column", "instruction"),
            [[str(p), "alpaca format", "--prompt_column", "--data_format prompt_response"]],
        ),
    ),
    # ---- data file paths
    (
        "missing-file",
        lambda c: (c.train("ptuning", p := c.tmp / "nope.jsonl"), [["--train_file", str(p), "no such file"]]),
    ),
    (
        "directory-instead-of-file",
        lambda c: (
            c.predict("lora", (p := c.tmp / "folder.json").mkdir() or p),
            [["--test_file", str(p), "is a folder"]],
        ),
    ),
    (
        "wrong-extension",
        lambda c: (
            c.train("lora", p := c.jsonl("train.txt", [GOOD])),
            [["--train_file", str(p), "expected a .json, .jsonl, .csv or .tsv file"]],
        ),
    ),
    # ---- flag combinations
    (
        "test_file-without-do_predict",
        lambda c: (c.train("lora", TOY_TRAIN, "--test_file", TOY_DEV), [["--test_file", "--do_predict"]]),
    ),
    (
        "no-task-flag",
        lambda c: (
            (
                "lora",
                ["--model_name_or_path", str(c.model), "--output_dir", str(c.out), "--train_file", str(TOY_TRAIN)],
            ),
            [["nothing to do", "--do_train"]],
        ),
    ),
    (
        "do_train-without-train_file",
        lambda c: (
            ("lora", ["--do_train", "--model_name_or_path", str(c.model), "--output_dir", str(c.out)]),
            [["--do_train needs --train_file"]],
        ),
    ),
    (
        "pre_seq_len-with-lora",
        lambda c: (c.train("lora", TOY_TRAIN, "--pre_seq_len", 8), [["--pre_seq_len", "P-Tuning v2"]]),
    ),
    ("lora_rank-with-ptuning", lambda c: (c.train("ptuning", TOY_TRAIN, "--lora_rank", 4), [["--lora_rank", "LoRA"]])),
    (
        "ptuning-train-without-pre_seq_len",
        lambda c: (
            ("ptuning", c.train("ptuning", TOY_TRAIN)[1][:-2]),  # drop the default --pre_seq_len 4
            [["--pre_seq_len is required"]],
        ),
    ),
    (
        "pre_seq_len-with-finetune",
        lambda c: (
            c.train("finetune", TOY_TRAIN, "--pre_seq_len", 8),
            [["--pre_seq_len", "P-Tuning v2", "finetune/main.py trains every weight of the base"]],
        ),
    ),
    (
        "lora_rank-with-finetune",
        lambda c: (c.train("finetune", TOY_TRAIN, "--lora_rank", 4), [["--lora_rank", "LoRA"]]),
    ),
    (
        "trainable_layers-with-lora",
        lambda c: (
            c.train("lora", TOY_TRAIN, "--trainable_layers", 1),
            [["--trainable_layers", "full fine-tuning", "run finetune/main.py"]],
        ),
    ),
    (
        "trainable_layers-beyond-the-model",
        lambda c: (
            c.train("finetune", TOY_TRAIN, "--trainable_layers", 3),
            [["--trainable_layers 3", "the model has 2 decoder layers", "give 1 to 2"]],
        ),
    ),
    (
        "quantized-base-with-finetune",
        lambda c: (
            c.train("finetune", TOY_TRAIN, "--quantization_bit", 4),
            [["--quantization_bit 4", "full fine-tuning", "cannot be trained", "lora/train.sh"]]
            + ([] if torch.cuda.is_available() else [["--quantization_bit 4 needs a CUDA GPU"]]),
        ),
    ),
    (
        "zero3-config-that-cannot-save-a-full-model",
        lambda c: (
            c.train("finetune", TOY_TRAIN, "--deepspeed", p := _zero3_without_gathering(c)),
            [
                [
                    f"--deepspeed {p}",
                    "full fine-tuning saves the whole model",
                    "stage3_gather_16bit_weights_on_model_save",
                ]
            ]
            + _ds_needs_a_gpu(p),
        ),
        needs_deepspeed,
    ),
    (
        "8bit-optimizer-with-optimizer-offload",
        lambda c: (
            c.train(
                "lora", TOY_TRAIN, "--deepspeed", p := DEEPSPEED / "zero3_offload.json", "--optim", "paged_adamw_8bit"
            ),
            _ds_needs_a_gpu(p) + [["--optim paged_adamw_8bit", "on the GPU", "offload_optimizer", "use one of them"]],
        ),
        needs_deepspeed,
    ),
    (
        "float16-weights-with-finetune",
        lambda c: (
            c.train("finetune", TOY_TRAIN, "--torch_dtype", "float16"),
            [["--torch_dtype float16", "full fine-tuning", "--fp16 computes in float16"]],
        ),
    ),
    (
        "quantization_bit-3",
        lambda c: (c.train("lora", TOY_TRAIN, "--quantization_bit", 3), [["--quantization_bit must be 4 or 8, got 3"]]),
    ),
    (
        "quantization_bit-4-without-gpu",
        lambda c: (c.train("lora", TOY_TRAIN, "--quantization_bit", 4), [["--quantization_bit 4 needs a CUDA GPU"]]),
        pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible"),
    ),
    (
        "max_source_length-0",
        lambda c: (
            c.train("lora", TOY_TRAIN, "--max_source_length", 0),
            [["--max_source_length must be a positive integer, got 0"]],
        ),
    ),
    (
        "max_target_length-minus-1",
        lambda c: (
            c.train("ptuning", TOY_TRAIN, "--max_target_length", -1),
            [["--max_target_length must be a positive integer, got -1"]],
        ),
    ),
    # ---- model folders
    (
        "model-path-missing",
        lambda c: (
            c.train("lora", TOY_TRAIN, model=(p := c.tmp / "no-model")),
            [["--model_name_or_path", str(p), "no such folder"]],
        ),
    ),
    (
        "model-folder-without-config",
        lambda c: (
            c.train("lora", TOY_TRAIN, model=(p := _model_dir(c.tmp / "empty-model", None))),
            [["--model_name_or_path", str(p), "no config.json"]],
        ),
    ),
    (
        "model-config-not-json",
        lambda c: (
            c.train("lora", TOY_TRAIN, model=(p := _model_dir(c.tmp / "bad-model", "{not json"))),
            [["--model_name_or_path", str(p), "config.json"]],
        ),
    ),
    (
        "model-config-unknown-type",
        lambda c: (
            c.train(
                "ptuning", TOY_TRAIN, model=(p := _model_dir(c.tmp / "odd-model", '{"model_type": "nonexistent"}'))
            ),
            [["--model_name_or_path", str(p), "nonexistent"]],
        ),
    ),
    # ---- checkpoints
    (
        "ptuning-checkpoint-from-other-base",
        lambda c: (
            c.predict("ptuning", TOY_DEV, model=_three_layer_model(c)),
            [["--ptuning_checkpoint", "different base model", "num_layers 2 there, 3 here"]],
        ),
    ),
    (
        "truncated-prefix-weights",
        lambda c: (
            c.predict("ptuning", TOY_DEV, checkpoint=(p := _corrupt(c, "ptuning", "prefix_encoder.safetensors"))),
            [[str(p / "prefix_encoder.safetensors"), "corrupt"]],
        ),
    ),
    (
        "corrupt-prefix-config",
        lambda c: (
            c.predict("ptuning", TOY_DEV, checkpoint=(p := _corrupt(c, "ptuning", "prefix_config.json"))),
            [["--ptuning_checkpoint", str(p / "prefix_config.json"), "corrupt"]],
        ),
    ),
    (
        "corrupt-lora-adapter-weights",
        lambda c: (
            c.predict("lora", TOY_DEV, checkpoint=(p := _corrupt(c, "lora", "adapter_model.safetensors"))),
            [["--lora_checkpoint", str(p / "adapter_model.safetensors"), "corrupt"]],
        ),
    ),
    (
        "ptuning-checkpoint-missing",
        lambda c: (
            c.predict("ptuning", TOY_DEV, checkpoint=(p := c.tmp / "no-ckpt")),
            [["--ptuning_checkpoint", str(p), "no such folder"]],
        ),
    ),
    (
        "unknown-flags",  # a typo, and transformers 4's --warmup_ratio (gone in 5): one plain line
        lambda c: (
            c.train("lora", TOY_TRAIN, "--lora_rnk", "3", "--warmup_ratio", "0.1"),
            [["unknown flags: --lora_rnk 3 --warmup_ratio 0.1", "--help"]],
        ),
    ),
    (
        "lora-checkpoint-is-a-prefix",  # was refused only after loading the base, by PEFT's message
        lambda c: (
            c.predict("lora", TOY_DEV, checkpoint=c.ptuning_checkpoint),
            [["--lora_checkpoint", "not a LoRA adapter folder (no adapter_config.json)", "--ptuning_checkpoint"]],
        ),
    ),
    (
        "ptuning-checkpoint-is-an-adapter",
        lambda c: (
            c.predict("ptuning", TOY_DEV, checkpoint=c.lora_checkpoint),
            [["--ptuning_checkpoint", "not a P-Tuning v2 checkpoint", "--lora_checkpoint"]],
        ),
    ),
    (
        "lora-checkpoint-empty-folder",
        lambda c: (
            c.predict("lora", TOY_DEV, checkpoint=(p := c.folder("empty"))),
            [[f"--lora_checkpoint {p}: not a LoRA adapter folder"]],
        ),
    ),
    # ---- output and resume folders
    (
        "resume-from-missing-folder",
        lambda c: (
            c.train("lora", TOY_TRAIN, "--resume_from_checkpoint", p := c.tmp / "no-such-checkpoint"),
            [["--resume_from_checkpoint", str(p), "no such folder"]],
        ),
    ),
    (
        "output_dir-under-a-file",
        lambda c: (
            _set_out(c, c.file("a-file", "x") / "out") or c.train("lora", TOY_TRAIN),
            [["--output_dir", str(c.tmp / "a-file" / "out"), "cannot be created", "is not a folder"]],
        ),
    ),
    (
        "resume-from-a-folder-that-is-not-a-checkpoint",
        lambda c: (
            c.train("lora", TOY_TRAIN, "--resume_from_checkpoint", p := _adapter_only(c)),
            [["--resume_from_checkpoint", str(p), "no trainer_state.json", "not a training checkpoint"]],
        ),
    ),
    # ---- warm starts: a checkpoint's own config against the flags given
    (
        "lora_rank-contradicts-the-warm-start-checkpoint",
        lambda c: (
            c.train("lora", TOY_TRAIN, "--lora_checkpoint", p := c.lora_checkpoint, "--lora_rank", 16),
            [[f"--lora_rank 16 contradicts --lora_checkpoint {p}", "(r 4 in its adapter_config.json)"]],
        ),
    ),
    (
        "lora_target-contradicts-the-warm-start-checkpoint",
        lambda c: (
            c.train("lora", TOY_TRAIN, "--lora_checkpoint", p := c.lora_checkpoint, "--lora_target", "q_proj"),
            [[f"--lora_target q_proj contradicts --lora_checkpoint {p}", "targets down_proj,gate_up_proj,k_proj"]],
        ),
    ),
    (
        "pre_seq_len-contradicts-the-warm-start-checkpoint",
        lambda c: (
            c.train("ptuning", TOY_TRAIN, "--ptuning_checkpoint", p := c.ptuning_checkpoint, "--pre_seq_len", 8),
            [[f"--pre_seq_len 8 contradicts --ptuning_checkpoint {p}", "(pre_seq_len 4 in its prefix_config.json)"]],
        ),
    ),
    (
        "init_lora_weights-with-a-warm-start",
        lambda c: (
            c.train("lora", TOY_TRAIN, "--lora_checkpoint", c.lora_checkpoint, "--init_lora_weights", "gaussian"),
            [["--init_lora_weights gaussian", "--lora_checkpoint's weights are the start"]],
        ),
    ),
    (
        "warm-start-of-an-adalora-adapter",
        lambda c: (
            c.train("lora", TOY_TRAIN, "--lora_checkpoint", p := _as_adalora(c)),
            [[f"--lora_checkpoint {p} is an AdaLoRA adapter", "cannot be trained further"]],
        ),
    ),
    (
        "lora-checkpoint-config-corrupt",
        lambda c: (
            c.predict("lora", TOY_DEV, checkpoint=(p := _corrupt(c, "lora", "adapter_config.json"))),
            [["--lora_checkpoint", str(p / "adapter_config.json"), "corrupt"]],
        ),
    ),
    # ---- LoRA options (glmtune/settings.py)
    (
        "init_lora_weights-unknown",
        lambda c: (
            c.train("lora", TOY_TRAIN, "--init_lora_weights", "xavier"),
            [["--init_lora_weights must be one of true, gaussian, pissa, olora, loftq, got 'xavier'"]],
        ),
    ),
    (
        "lora_variant-unknown",
        lambda c: (
            c.train("lora", TOY_TRAIN, "--lora_variant", "vera"),
            [["--lora_variant must be one of lora, adalora, got 'vera'"]],
        ),
    ),
    (
        "use_dora-with-ptuning",
        lambda c: (c.train("ptuning", TOY_TRAIN, "--use_dora"), [["--use_dora", "belong to LoRA"]]),
    ),
    (
        "use_dora-with-adalora",
        lambda c: (
            c.train("lora", TOY_TRAIN, *ADALORA, "--use_dora"),
            [["--use_dora cannot be combined with --lora_variant adalora"]],
        ),
    ),
    (
        "loraplus-with-adalora",
        lambda c: (
            c.train("lora", TOY_TRAIN, *ADALORA, "--loraplus_lr_ratio", 16),
            [["--loraplus_lr_ratio cannot be combined with --lora_variant adalora"]],
        ),
    ),
    (
        "adalora-without-max_steps",
        lambda c: (
            c.train("lora", TOY_TRAIN, "--lora_variant", "adalora", "--num_train_epochs", 1),
            [["--lora_variant adalora needs --max_steps"]],
        ),
    ),
    (
        "adalora-schedule-without-steps-to-reallocate",
        lambda c: (
            c.train("lora", TOY_TRAIN, *ADALORA, "--adalora_tfinal", 10),
            [["--adalora_tinit 0 + --adalora_tfinal 10 leave no step of --max_steps 10"]],
        ),
    ),
    (
        "adalora_init_rank-below-lora_rank",
        lambda c: (
            c.train("lora", TOY_TRAIN, *ADALORA, "--adalora_init_rank", 4),
            [["--adalora_init_rank 4 must be at least --lora_rank 8"]],
        ),
    ),
    (
        "adalora-with-target_token_loss",
        lambda c: (
            c.train("lora", TOY_TRAIN, *ADALORA, "--target_token_loss", "True"),
            [["--target_token_loss cannot be combined with --lora_variant adalora", "orthogonality penalty"]],
        ),
    ),
    (
        "adalora-resumed",
        lambda c: (
            c.train("lora", TOY_TRAIN, *ADALORA, "--resume_from_checkpoint", c.tmp),
            [["--resume_from_checkpoint cannot continue an AdaLoRA run"]],
        ),
    ),
    (
        "adalora-flag-without-adalora",
        lambda c: (
            c.train("lora", TOY_TRAIN, "--adalora_tinit", 3),
            [["--adalora_tinit applies to --lora_variant adalora only"]],
        ),
    ),
    (
        "loftq-without-a-4-bit-base",
        lambda c: (
            c.train("lora", TOY_TRAIN, "--init_lora_weights", "loftq"),
            [["--init_lora_weights loftq", "add --quantization_bit 4"]],
        ),
    ),
    (
        "pissa-on-a-quantized-base",
        lambda c: (
            c.train("lora", TOY_TRAIN, "--init_lora_weights", "pissa", "--quantization_bit", 4),
            [["--init_lora_weights pissa", "4-bit base", "drop --quantization_bit"], ["--quantization_bit 4 needs"]],
        ),
        pytest.mark.skipif(torch.cuda.is_available(), reason="the second line is the CPU machine's"),
    ),
    (
        "use_dora-with-pissa",
        lambda c: (
            c.train("lora", TOY_TRAIN, "--use_dora", "--init_lora_weights", "olora"),
            [["--use_dora cannot be combined with --init_lora_weights olora"]],
        ),
    ),
    # ---- numbers: every numeric flag is checked before anything is loaded or written
    *[
        (
            f"{flag}-{value}",
            lambda c, flag=flag, value=value, method=method: (
                c.train(method, TOY_TRAIN, f"--{flag}", value),
                [[f"--{flag} must be", f"got {value}"]],
            ),
        )
        for flag, value, method in [
            ("per_device_train_batch_size", "0", "ptuning"),
            ("per_device_eval_batch_size", "0", "lora"),
            ("gradient_accumulation_steps", "0", "lora"),
            ("max_steps", "0", "ptuning"),
            ("save_steps", "0", "lora"),
            ("logging_steps", "-5", "ptuning"),
            ("num_train_epochs", "0", "lora"),
            ("learning_rate", "nan", "ptuning"),
            ("learning_rate", "-0.01", "lora"),
            ("weight_decay", "-1", "lora"),
            ("adam_beta1", "1.5", "ptuning"),
            ("eval_accumulation_steps", "0", "lora"),
            ("max_grad_norm", "inf", "ptuning"),
            ("seed", "-1", "lora"),
            ("save_total_limit", "0", "ptuning"),
            ("dataloader_num_workers", "-2", "lora"),
            ("top_p", "0", "lora"),
            ("temperature", "0", "ptuning"),
            ("repetition_penalty", "-1", "lora"),
            ("lora_alpha", "0", "lora"),
            ("loraplus_lr_ratio", "0", "lora"),
            ("loraplus_lr_ratio", "-2", "lora"),
            ("lora_dropout", "1.0", "lora"),
            ("prefix_dropout", "-0.1", "ptuning"),
            ("pre_seq_len", "0", "ptuning"),
            ("trainable_layers", "0", "finetune"),
            ("max_train_samples", "0", "lora"),
            ("preprocessing_num_workers", "0", "ptuning"),
        ]
    ],
    (
        "several-bad-numbers-reported-together",
        lambda c: (
            c.train("lora", TOY_TRAIN, "--per_device_train_batch_size", 0, "--learning_rate", "nan", "--max_steps", 0),
            [["--per_device_train_batch_size"], ["--max_steps"], ["--learning_rate"]],
        ),
    ),
    (
        "non-number-for-a-number",
        lambda c: (c.train("lora", TOY_TRAIN, "--max_steps", "ten"), [["--max_steps", "invalid int value: 'ten'"]]),
    ),
    (
        "unknown-scheduler-name",
        lambda c: (
            c.train("ptuning", TOY_TRAIN, "--lr_scheduler_type", "cosinus"),
            [["--lr_scheduler_type", "invalid choice: 'cosinus'", "'cosine'"]],
        ),
    ),
    (
        "report_to-integration-not-installed",
        lambda c: (
            c.train("lora", TOY_TRAIN, "--report_to", "wandb"),
            [["--report_to wandb", "not installed", "--report_to none"]],
        ),
    ),
    (
        "max_memory_gib-without-a-gpu",
        lambda c: (c.train("lora", TOY_TRAIN, "--max_memory_gib", 6), [["--max_memory_gib 6", "no CUDA GPU"]]),
        pytest.mark.skipif(torch.cuda.is_available(), reason="the case is a machine without a GPU"),
    ),
    # ---- names: a name that matches nothing is an error listing what exists
    (
        "lora-target-typo",
        lambda c: (
            c.train("lora", TOY_TRAIN, "--lora_target", "q_proj,v_prj"),
            [["--lora_target q_proj,v_prj", "no module named v_prj", "v_proj", "(or all)"]],
        ),
    ),
    (
        "modules_to_save-typo",
        lambda c: (
            c.train("lora", TOY_TRAIN, "--modules_to_save", "embed_token,lm_head"),
            [["--modules_to_save embed_token,lm_head", "no module named embed_token", "embed_tokens, gate_up_proj"]],
        ),
    ),
    (
        "modules_to_save-name-ending-of-other-modules",
        lambda c: (
            c.train("lora", TOY_TRAIN, "--modules_to_save", "norm"),
            [["--modules_to_save norm", "input_layernorm, post_attention_layernorm", "model.norm"]],
        ),
    ),
    # ---- a tokenizer with more tokens than the base's embeddings: only LoRA trains and saves the new rows
    (
        "added-tokens-lora-without-modules_to_save",
        lambda c: (
            c.train("lora", TOY_TRAIN, model=c.llama),
            [["624 tokens", "600 rows (24 added tokens)", "add --modules_to_save embed_tokens,lm_head"]],
        ),
    ),
    (
        "added-tokens-modules_to_save-without-the-head",
        lambda c: (
            c.train("lora", TOY_TRAIN, "--modules_to_save", "embed_tokens", model=c.llama),
            [["--modules_to_save embed_tokens leaves out lm_head", "use --modules_to_save embed_tokens,lm_head"]],
        ),
    ),
    (
        "added-tokens-ptuning",
        lambda c: (
            c.train("ptuning", TOY_TRAIN, model=c.llama),
            [
                [
                    "24 added tokens",
                    "P-Tuning v2 keeps the base frozen",
                    "LoRA with --modules_to_save embed_tokens,lm_head",
                ]
            ],
        ),
    ),
    (
        "added-tokens-base-alone",
        lambda c: (
            _base_alone(c, c.llama),
            [["24 added tokens", "the base alone has no rows for those tokens"]],
        ),
    ),
    (
        "added-tokens-adapter-without-their-rows",
        lambda c: (
            c.predict("lora", TOY_DEV, checkpoint=(p := _without_saved_modules(c)), model=c.llama),
            [["24 added tokens", f"the adapter {p} carries no trained rows", "embed_tokens, lm_head"]],
        ),
    ),
    (
        "model-weights-corrupt",
        lambda c: (
            c.train("ptuning", TOY_TRAIN, model=(p := _corrupt_model(c))),
            [["--model_name_or_path", str(p), "cannot load the model"]],
        ),
    ),
]


def _zero3_without_gathering(case):
    config = json.loads((DEEPSPEED / "zero3.json").read_text())
    del config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"]
    return case.file("zero3-sharded-save.json", json.dumps(config))


def _ds_needs_a_gpu(config) -> list:
    return [] if torch.cuda.is_available() else [[f"--deepspeed {config} needs CUDA GPUs"]]


def _adapter_only(case):
    """A LoRA adapter's own files, without a trainer's state: not a checkpoint to resume from."""
    folder = case.tmp / "adapter-only"
    folder.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(case.lora_checkpoint / name, folder / name)
    return folder


def _base_alone(case, model):
    """Evaluation of the base alone (no checkpoint)."""
    method, argv = case.predict("lora", TOY_DEV, model=model)
    at = argv.index("--lora_checkpoint")
    return method, argv[:at] + argv[at + 2 :]


def _without_saved_modules(case):
    """The Llama adapter as if trained without --modules_to_save: LoRA pairs only."""
    from safetensors.torch import load_file, save_file

    folder = case.copy(case.llama_adapter, "no-modules")
    weights = load_file(folder / "adapter_model.safetensors")
    save_file({k: v for k, v in weights.items() if ".lora_" in k}, folder / "adapter_model.safetensors")
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "modules_to_save": None}))
    return folder


def _as_adalora(case):
    """The session's LoRA adapter with an AdaLoRA config (what PEFT writes for one: peft_type, init_r, target_r)."""
    folder = case.copy(case.lora_checkpoint, "adalora-ckpt")
    config = json.loads((folder / "adapter_config.json").read_text())
    config.update(peft_type="ADALORA", init_r=4, target_r=4, total_step=2)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def _corrupt_model(case):
    """The tiny model with its weights file cut in half."""
    folder = case.copy(case.model, "corrupt-model")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return folder


def _model_dir(path, config_text):
    path.mkdir()
    if config_text is not None:
        (path / "config.json").write_text(config_text)
    return path


def _three_layer_model(case):
    from scripts import build_tiny_model as tiny

    out = case.tmp / "three-layers"
    tiny.build(str(TOY_TRAIN), str(out), steps=0, num_hidden_layers=3)
    return out


def _corrupt(case, method, name):
    folder = case.copy(case.ptuning_checkpoint if method == "ptuning" else case.lora_checkpoint, f"{method}-ckpt")
    path = folder / name
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return folder


def _set_out(case, out):
    case.out = out


@pytest.mark.parametrize("setup", [pytest.param(setup, marks=marks, id=name) for name, setup, *marks in CASES])
def test_bad_input_gives_one_clear_error(tmp_path, request, capsys, setup):
    case = Case(tmp_path, request)
    (method, argv), expected = setup(case)
    before = _files(tmp_path)
    capsys.readouterr()  # drop what the setup printed
    with pytest.raises(SystemExit) as info:
        main(method, argv)
    err = capsys.readouterr().err
    assert info.value.code == 2, err
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == len(expected), err
    for line, needles in zip(errors, expected):
        for needle in needles:
            assert needle in line, (needle, line)
        assert len(line) < 2000, line[:300]  # never echoes a huge input line back
    assert not case.out.exists()
    assert _files(tmp_path) == before  # nothing written next to the inputs


def test_output_dir_with_checkpoints_of_another_run_is_left_alone(tmp_path, tiny_model_dir, capsys):
    out = tmp_path / "out"
    (out / "checkpoint-5").mkdir(parents=True)
    (out / "checkpoint-5" / "trainer_state.json").write_text("{}")
    before = _files(tmp_path)
    with pytest.raises(SystemExit) as info:
        main(
            "lora",
            [
                "--do_train",
                "--train_file",
                str(TOY_TRAIN),
                "--model_name_or_path",
                str(tiny_model_dir),
                "--output_dir",
                str(out),
                *SMALL,
            ],
        )
    err = capsys.readouterr().err
    assert info.value.code == 2 and "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"--output_dir {out} holds another run's files" in errors[0], err
    assert "--overwrite_output_dir" in errors[0]
    assert _files(tmp_path) == before


def test_tokenizer_without_pad_token_falls_back_to_eos(tmp_path, tiny_model_dir, caplog):
    """Positive control: a tokenizer with no pad token is not an error (padding uses eos)."""
    model = shutil.copytree(tiny_model_dir, tmp_path / "model")
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = model / name
        if path.exists():
            data = json.loads(path.read_text(encoding="utf-8"))
            data.pop("pad_token", None)
            path.write_text(json.dumps(data), encoding="utf-8")
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(model).pad_token is None  # the setup really removed it
    out = tmp_path / "out"
    caplog.set_level(logging.INFO, logger="glmtune.model")
    main(
        "lora",
        [
            "--do_predict",
            "--test_file",
            str(TOY_DEV),
            "--model_name_or_path",
            str(model),
            "--output_dir",
            str(out),
            "--max_predict_samples",
            "2",
            *SMALL,
        ],
    )
    assert "padding with the eos token" in caplog.text
    assert (out / "generated_predictions.txt").read_text(encoding="utf-8").count("\n") == 2


# ---- merging a chain of LoRA adapters (scripts/merge_lora.py): the same promise, one error: line per problem
MERGE_CASES = [
    (
        "merge-chain-with-a-missing-checkpoint",
        lambda c: (
            [f"{c.lora_checkpoint},{(p := c.tmp / 'no-such-adapter')}"],
            [[f"--checkpoint {p}: no such folder"]],
        ),
    ),
    (
        "merge-chain-of-adapters-for-different-bases",
        lambda c: (
            [str(c.lora_checkpoint), str(c.llama_adapter)],
            [[f"--checkpoint {c.llama_adapter}", "trained on a different base", "size mismatch"]],
        ),
    ),
    (
        "merge-chain-with-a-ptuning-checkpoint",
        lambda c: (
            [f"{c.lora_checkpoint},{c.ptuning_checkpoint}"],
            [[f"--checkpoint {c.ptuning_checkpoint} is a P-Tuning v2 checkpoint", "cannot be merged"]],
        ),
    ),
]


@pytest.mark.parametrize("setup", [pytest.param(setup, id=name) for name, setup in MERGE_CASES])
def test_bad_merge_chain_gives_one_clear_error(tmp_path, request, capsys, setup):
    from test_merge_lora import run_in_process

    case = Case(tmp_path, request)
    checkpoints, expected = setup(case)
    out = tmp_path / "merged"
    flags = ["--model_name_or_path", case.model, "--output", out]
    for checkpoint in checkpoints:  # repeated --checkpoint, or one comma-separated list
        flags += ["--checkpoint", checkpoint]
    before = _files(tmp_path)
    code, err = run_in_process(capsys, *flags)
    assert code == 2 and "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == len(expected), err
    for line, needles in zip(errors, expected):
        for needle in needles:
            assert needle in line, (needle, line)
    assert not out.exists() and not (tmp_path / "merged.partial").exists()
    assert _files(tmp_path) == before
