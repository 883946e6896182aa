"""Tests for glmtune.records: the data formats (prompt_response, alpaca, conversations, messages), CSV / TSV
files, format detection, --keep_columns, and the error each malformed record gives."""

import json
import logging

import pytest
from conftest import REPO, write_jsonl

from glmtune.arguments import DataArguments
from glmtune.data import resolve_format
from glmtune.errors import DataError
from glmtune.records import detect_format, read_records


def _read(path, data_format, columns=("content", "summary", None), keep=()) -> list:
    return list(read_records(str(path), data_format, columns, keep))


def _error(path, data_format, columns=("content", "summary", None), keep=()) -> str:
    with pytest.raises(DataError) as info:
        _read(path, data_format, columns, keep)
    return str(info.value)


def _messages(*pairs) -> list:
    """(role, content) or (role, content, metadata) tuples -> normalized messages."""
    return [{"role": p[0], "content": p[1], "metadata": p[2] if len(p) > 2 else ""} for p in pairs]


# ----------------------------------------------------------------------------- alpaca

ALPACA = [
    {"instruction": "把下面的句子翻译成英文", "input": "你好", "output": "Hello"},
    {"instruction": "写一句问候语", "input": "", "output": "早上好！"},
    {"instruction": "继续", "output": "好的", "history": [["第一问", "第一答"]], "system": "你是助手"},
]


def test_alpaca_joins_instruction_and_input_with_a_newline(tmp_path):
    rows = _read(write_jsonl(tmp_path / "a.jsonl", ALPACA), "alpaca")
    assert rows[0]["messages"] == _messages(("user", "把下面的句子翻译成英文\n你好"), ("assistant", "Hello"))
    assert rows[1]["messages"] == _messages(
        ("user", "写一句问候语"), ("assistant", "早上好！")
    )  # empty input: no newline
    assert rows[2]["messages"] == _messages(
        ("user", "第一问"), ("assistant", "第一答"), ("user", "继续"), ("assistant", "好的")
    )
    assert [row["system"] for row in rows] == ["", "", "你是助手"]
    assert not any(row["every_reply"] for row in rows)  # the last reply only, as prompt_response


@pytest.mark.parametrize("suffix, delimiter", [(".csv", ","), (".tsv", "\t")])
def test_alpaca_from_csv_and_tsv_with_a_json_history_cell(tmp_path, suffix, delimiter):
    import csv

    path = tmp_path / f"alpaca{suffix}"
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, delimiter=delimiter)
        writer.writerow(["instruction", "input", "output", "history"])
        writer.writerow(["翻译", "第一行\n第二行, 带逗号", '他说"好"', ""])
        writer.writerow(["继续", "", "好的", json.dumps([["q", "a"]], ensure_ascii=False)])
    rows = _read(path, "alpaca")
    assert rows[0]["messages"] == _messages(("user", "翻译\n第一行\n第二行, 带逗号"), ("assistant", '他说"好"'))
    assert rows[1]["messages"] == _messages(("user", "q"), ("assistant", "a"), ("user", "继续"), ("assistant", "好的"))
    assert [row["where"] for row in rows] == [f"{path}:2", f"{path}:4"]  # the quoted cell spans lines 2-3
    assert detect_format(str(path)) == "alpaca"


def test_prompt_response_from_csv(tmp_path):
    path = tmp_path / "adgen.csv"
    path.write_text('content,summary,history\n类型#裙,"一条裙子,很好看。",\n', encoding="utf-8")
    [row] = _read(path, "prompt_response", ("content", "summary", "history"))
    assert row["messages"] == _messages(("user", "类型#裙"), ("assistant", "一条裙子,很好看。"))
    assert detect_format(str(path)) == "prompt_response"


# ----------------------------------------------------------------------------- conversations, messages

TOOLS = [{"name": "get_weather", "description": "查询天气", "parameters": {"city": "string"}}]
CONVERSATION = {
    "tools": TOOLS,
    "conversations": [
        {"role": "system", "content": "你是天气助手"},
        {"role": "user", "content": "北京天气？"},
        {"role": "assistant", "content": "我来查一下。"},
        {"role": "tool", "name": "get_weather", "parameters": {"city": "北京"}, "observation": {"temp": 22}},
        {"role": "assistant", "content": "北京 22 度。"},
        {"role": "user", "content": "谢谢"},
        {"role": "assistant", "content": None},
    ],
}


def test_conversations_with_chatglm3_tools(tmp_path):
    [row] = _read(write_jsonl(tmp_path / "c.jsonl", [CONVERSATION]), "conversations")
    assert row["system"] == "你是天气助手"
    assert row["tools"] == json.dumps(TOOLS, indent=4, ensure_ascii=False)
    assert row["messages"] == _messages(
        ("user", "北京天气？"),
        ("assistant", "我来查一下。"),
        ("assistant", "```python\ntool_call(city='北京')\n```", "get_weather"),  # ChatGLM3 finetune_demo's call
        ("observation", '{"temp": 22}'),
        ("assistant", "北京 22 度。"),
        ("user", "谢谢"),
        ("assistant", ""),
    )
    assert row["every_reply"] is True


def test_messages_format_and_a_conversation_without_its_last_reply(tmp_path):
    record = {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]}
    [row] = _read(write_jsonl(tmp_path / "m.jsonl", [record]), "messages")
    assert row["system"] == "s" and row["tools"] == ""
    assert row["messages"] == _messages(("user", "q"), ("assistant", ""))  # predicted with an empty label


# ----------------------------------------------------------------------------- detection, --keep_columns


@pytest.mark.parametrize(
    "record, expected",
    [
        (ALPACA[0], "alpaca"),
        ({"conversations": [{"role": "user", "content": "q"}]}, "conversations"),
        ({"messages": [{"role": "user", "content": "q"}]}, "messages"),
        ({"content": "c", "summary": "s"}, "prompt_response"),
        ({"instruction": "no output field"}, "prompt_response"),
        ({"conversations": "not a list"}, "prompt_response"),
    ],
)
def test_the_format_is_detected_from_the_first_record(tmp_path, record, expected):
    path = write_jsonl(tmp_path / "d.jsonl", ["", record, {"content": "c", "summary": "s"}])
    assert detect_format(str(path)) == expected
    array = tmp_path / "d.json"
    array.write_text(json.dumps([record]), encoding="utf-8")
    assert detect_format(str(array)) == expected


def test_detected_format_is_logged_and_column_flags_do_not_fit_it(tmp_path, caplog):
    path = write_jsonl(tmp_path / "a.jsonl", ALPACA)
    with caplog.at_level(logging.INFO, logger="glmtune.data"):
        assert resolve_format(str(path), DataArguments()) == "alpaca"
    assert f"{path}: data format alpaca (from its first record" in caplog.text
    assert resolve_format(str(path), DataArguments(data_format="prompt_response")) == "prompt_response"
    with pytest.raises(DataError, match="--prompt_column name prompt_response fields"):
        resolve_format(str(path), DataArguments(prompt_column="instruction"))


def test_keep_columns_are_kept_as_json(tmp_path):
    records = [{"content": "c", "summary": "s", "sample_id": 7, "task_type": "cls"}]
    [row] = _read(write_jsonl(tmp_path / "k.jsonl", records), "prompt_response", keep=("sample_id", "task_type"))
    assert json.loads(row["keep"]) == {"sample_id": 7, "task_type": "cls"}


# ----------------------------------------------------------------------------- malformed records


def _conversation(*messages, key="conversations") -> dict:
    return {key: list(messages)}


USER, ASSISTANT = {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}
MALFORMED = [
    (
        "alpaca-missing-instruction",
        "alpaca",
        {"input": "x", "output": "y"},
        ["no field 'instruction'", "input, output"],
    ),
    ("alpaca-output-not-a-string", "alpaca", {"instruction": "i", "output": 3}, ["field 'output' must be a string"]),
    ("alpaca-history-shape", "alpaca", {**ALPACA[0], "history": ["q"]}, ["field 'history'", "[query, answer] pairs"]),
    ("conversations-missing", "conversations", {"messages": []}, ["no field 'conversations'", "fields present"]),
    ("conversations-not-a-list", "conversations", {"conversations": "hi"}, ["'conversations' must be a list", "str"]),
    (
        "unknown-role",
        "conversations",
        _conversation(USER, {"role": "bot", "content": "a"}),
        ["'conversations[1].role'", "unknown role 'bot'", "system, user, assistant, observation, tool"],
    ),
    ("message-not-an-object", "messages", _conversation("hi", key="messages"), ["'messages[0]' must be an object"]),
    (
        "assistant-first",
        "conversations",
        _conversation({"role": "system", "content": "s"}, ASSISTANT, USER),
        ["'conversations[1].role'", "first message (after system) must be from the user", "'assistant'"],
    ),
    ("two-users-in-a-row", "messages", _conversation(USER, USER, key="messages"), ["'messages[1].role'", "in a row"]),
    (
        "system-after-user",
        "conversations",
        _conversation(USER, {"role": "system", "content": "s"}),
        ["'conversations[1]'", "a system message must come before the other messages"],
    ),
    (
        "observation-without-call",
        "conversations",
        _conversation(USER, {"role": "observation", "content": "o"}),
        ["'conversations[1].role'", "observation must follow"],
    ),
    ("content-not-a-string", "conversations", _conversation({"role": "user", "content": 5}), [".content' must be"]),
    ("no-content", "conversations", _conversation({"role": "user"}), ["'conversations[0]' has no 'content'"]),
    ("no-user", "conversations", _conversation({"role": "system", "content": "s"}), ["has no user message"]),
    (
        "tool-without-name",
        "conversations",
        _conversation(USER, {"role": "tool", "parameters": {}, "observation": "o"}),
        ["'conversations[1].name'"],
    ),
    (
        "tool-without-observation",
        "conversations",
        _conversation(USER, {"role": "tool", "name": "t", "parameters": {}}),
        ["'conversations[1]' has no 'observation'"],
    ),
]


@pytest.mark.parametrize("data_format, record, needles", [m[1:] for m in MALFORMED], ids=[m[0] for m in MALFORMED])
def test_a_record_that_does_not_fit_its_format_names_file_line_and_field(tmp_path, data_format, record, needles):
    good = {"alpaca": ALPACA[0], "conversations": _conversation(USER, ASSISTANT)}
    good["messages"] = _conversation(USER, ASSISTANT, key="messages")
    path = write_jsonl(tmp_path / "bad.jsonl", [good[data_format], record])
    message = _error(path, data_format)
    assert message.startswith(f"{path}:2: ")
    for needle in needles:
        assert needle in message, (needle, message)


def test_csv_row_with_a_missing_or_extra_field_names_its_line(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text('content,summary\n"a",b\n\n"c"\n', encoding="utf-8")
    assert _error(path, "prompt_response") == f"{path}:4: 1 fields, but the header row has 2 (content, summary)"
    path.write_text("content\tsummary\na\tb\tc\n", encoding="utf-8")
    (tsv := tmp_path / "bad.tsv").write_bytes(path.read_bytes())
    assert _error(tsv, "prompt_response").startswith(f"{tsv}:2: 3 fields, but the header row has 2")


def test_malformed_csv_quoting_names_the_line(tmp_path):
    path = tmp_path / "quote.csv"
    path.write_text('content,summary\na,b\n"c"x,d\n', encoding="utf-8")
    assert _error(path, "prompt_response").startswith(f"{path}:3: malformed CSV")


def test_csv_history_cell_that_is_not_json(tmp_path):
    path = tmp_path / "h.csv"
    path.write_text("content,summary,history\nq,a,[[oops\n", encoding="utf-8")
    message = _error(path, "prompt_response", ("content", "summary", "history"))
    assert message.startswith(f"{path}:2: field 'history' must hold JSON")


def test_conversations_cannot_come_from_a_csv_file(tmp_path):
    path = tmp_path / "c.csv"
    path.write_text("conversations\n[]\n", encoding="utf-8")
    assert "--data_format conversations needs JSON" in _error(path, "conversations")


def test_keep_columns_naming_an_absent_field(tmp_path):
    path = write_jsonl(
        tmp_path / "k.jsonl", [{"content": "c", "summary": "s", "sample_id": 1}, {"content": "c", "summary": "s"}]
    )
    message = _error(path, "prompt_response", keep=("sample_id",))
    assert message == f"{path}:2: no field 'sample_id' (--keep_columns); fields present: content, summary"


@pytest.mark.parametrize(
    "name, data_format",
    [
        ("alpaca.json", "alpaca"),
        ("conversations.jsonl", "conversations"),
        ("messages.jsonl", "messages"),
        ("prompt_response.csv", "prompt_response"),
    ],
)
def test_the_example_files_are_what_data_readme_says(name, data_format):
    path = str(REPO / "data" / "examples" / name)
    assert detect_format(path) == data_format
    rows = list(read_records(path, data_format, ("content", "summary", "history")))
    assert len(rows) >= 2 and all(row["messages"][-1]["content"] for row in rows)
    assert any(len(row["messages"]) > 2 for row in rows)  # each file has a multi-turn record
    assert f"data/examples/{name}" in (REPO / "data" / "README.md").read_text(encoding="utf-8")
