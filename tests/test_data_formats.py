"""Each data format through the real entry point: train a few steps on the tiny model and predict, from JSON lines,
a JSON array, CSV and TSV; the predictions file keeps the --keep_columns fields, in input order."""

import csv
import json
import logging
import math
import shutil

import pytest
from conftest import write_jsonl

from glmtune.cli import main

SMALL = ["--max_source_length", "48", "--max_target_length", "16", "--max_new_tokens", "4", "--report_to", "none"]
PAIRS = [
    ("类型#裙*颜色#红色", "一条红色的裙子。"),
    ("类型#裤*颜色#蓝色", "一条蓝色的裤子。"),
    ("类型#上衣*风格#清新", "清新的上衣。"),
    ("类型#裙*裙长#中长裙", "中长裙，很好看。"),
]


def _alpaca(path):
    records = [{"instruction": "写一句广告词", "input": q, "output": a} for q, a in PAIRS]
    path.write_text(json.dumps(records, ensure_ascii=False, indent=1), encoding="utf-8")  # a JSON array
    return [a for _, a in PAIRS]


def _tsv(path):
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, delimiter="\t")
        writer.writerow(["sample_id", "content", "summary", "history"])
        for index, (q, a) in enumerate(PAIRS):
            history = json.dumps([list(PAIRS[index - 1])], ensure_ascii=False) if index else ""
            writer.writerow([f"id-{index}", q, a, history])
    return [a for _, a in PAIRS]


def _conversations(path, key="conversations"):
    system = [{"role": "system", "content": "你是导购。"}]
    records = [
        {key: system + _turns(*PAIRS[max(index - 1, 0) : index + 1]), "sample_id": f"id-{index}"}
        for index in range(len(PAIRS))
    ]
    write_jsonl(path, records)
    return [a for _, a in PAIRS]


def _turns(*pairs):
    return [{"role": role, "content": text} for q, a in pairs for role, text in (("user", q), ("assistant", a))]


# format, file name, writer, flags (None: the format is detected and logged)
FORMATS = {
    "alpaca": ("train.json", _alpaca, None),
    "prompt_response-tsv": ("train.tsv", _tsv, ["--history_column", "history", "--keep_columns", "sample_id"]),
    "conversations": ("train.jsonl", _conversations, ["--keep_columns", "sample_id"]),
    "messages": ("train.jsonl", lambda path: _conversations(path, "messages"), ["--data_format", "messages"]),
}


@pytest.fixture(scope="module")
def chat_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model with a GLM-4-style chat template: prompts come from the template."""
    from test_prompt import CHAT_TEMPLATE
    from transformers import AutoTokenizer

    folder = shutil.copytree(tiny_model_dir, tmp_path_factory.mktemp("chat") / "model")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("name", FORMATS)
def test_each_format_trains_and_predicts_through_the_entry_point(
    name, tmp_path, tiny_model_dir, chat_model_dir, caplog
):
    file_name, write, flags = FORMATS[name]
    data = tmp_path / file_name
    answers = write(data)
    model = chat_model_dir if name == "messages" else tiny_model_dir
    out = tmp_path / "out"
    argv = ["--do_train", "--do_predict", "--train_file", data, "--test_file", data, "--model_name_or_path", model]
    argv += ["--output_dir", out, "--max_steps", "2", "--per_device_train_batch_size", "2", "--lora_rank", "4"]
    caplog.set_level(logging.INFO, logger="glmtune")
    main("lora", [str(x) for x in [*argv, *SMALL, *(flags or [])]])

    if flags is None:
        assert f"{data}: data format {name} (from its first record" in caplog.text
    train_loss = json.loads((out / "train_results.json").read_text())["train_loss"]
    assert math.isfinite(train_loss) and train_loss > 0
    rows = [json.loads(line) for line in (out / "generated_predictions.txt").read_text(encoding="utf-8").splitlines()]
    assert [row["labels"] for row in rows] == answers  # every record, in order, its last reply as the label
    assert all(isinstance(row["predict"], str) for row in rows)
    if "--keep_columns" in (flags or []):
        assert [list(row) for row in rows] == [["sample_id", "labels", "predict"]] * len(PAIRS)
        assert [row["sample_id"] for row in rows] == [f"id-{i}" for i in range(len(PAIRS))]
    else:
        assert all(list(row) == ["labels", "predict"] for row in rows)
