"""Tests for glmtune.data: reading and validating files, tokenization and labels, truncation, batch padding."""

import json
import logging
import os

import datasets
import pytest
import torch
from conftest import TOY_DEV, conversation_row, encoder_batch, write_jsonl

from glmtune.arguments import IGNORE_INDEX, DataArguments
from glmtune.data import Collator, load_split, tokenize
from glmtune.encoding import Encoder, PromptEncoder
from glmtune.errors import DataError
from glmtune.prompt import PromptFormat
from glmtune.records import FEATURES, read_records

CUE = "\n\n答："  # chatglm2's answer cue
HEAD = "[Round 1]\n\n问："  # what chatglm2 writes before a query without history
LONG_TEXT = "类型#裤*版型#宽松*风格#简约*图案#碎花*颜色#驼色*材质#雪纺*裤长#五分裤*裤型#牛仔裤" * 4


@pytest.fixture(autouse=True)
def private_datasets_cache(tmp_path, monkeypatch):
    """Keep datasets' cache for these tests in tmp_path (read when a builder is created)."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-datasets-cache"))
    datasets.disable_progress_bars()


def _args(**overrides) -> DataArguments:
    values = dict(
        prompt_column="content",
        response_column="summary",
        max_source_length=64,
        max_target_length=16,
        val_max_target_length=8,
    )
    return DataArguments(**{**values, **overrides})


def _dataset(rows) -> datasets.Dataset:
    """rows: (prompt, response) or (prompt, response, history) tuples."""
    return datasets.Dataset.from_list([conversation_row(*row) for row in rows], features=FEATURES)


def _pairs(row: dict) -> dict:
    """A prompt_response row read back as prompt, response and [query, answer] history."""
    contents = [message["content"] for message in row["messages"]]
    history = [list(pair) for pair in zip(contents[:-2:2], contents[1:-2:2])]
    return {"prompt": contents[-2], "response": contents[-1], "history": history}


def _read(path, history_column=None) -> list:
    return [_pairs(row) for row in read_records(str(path), "prompt_response", ("content", "summary", history_column))]


def _error(path, history_column=None) -> str:
    with pytest.raises(DataError) as info:
        _read(path, history_column)
    return str(info.value)


# ----------------------------------------------------------------------------- reading


RECORDS = [
    {"content": "类型#裤*颜色#红", "summary": "一条红裤子。"},
    {"content": "类型#裙", "summary": None},
    {"content": None, "summary": "只有回答"},
]
EXPECTED = [
    {"prompt": "类型#裤*颜色#红", "response": "一条红裤子。", "history": []},
    {"prompt": "类型#裙", "response": "", "history": []},
    {"prompt": "", "response": "只有回答", "history": []},
]


def test_a_record_becomes_a_conversation_of_one_reply(tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"content": "q2", "summary": "a2", "history": [["q1", "a1"]]}])
    [row] = read_records(str(path), "prompt_response", ("content", "summary", "history"))
    assert row == {
        "system": "",
        "tools": "",
        "messages": [
            {"role": "user", "content": "q1", "metadata": ""},
            {"role": "assistant", "content": "a1", "metadata": ""},
            {"role": "user", "content": "q2", "metadata": ""},
            {"role": "assistant", "content": "a2", "metadata": ""},
        ],
        "every_reply": False,  # the history's answers are context, not targets
        "where": f"{path}:1",
        "keep": "",
    }


def test_json_lines_and_json_array_give_the_same_records(tmp_path):
    lines = write_jsonl(tmp_path / "lines.jsonl", [RECORDS[0], "", "   ", RECORDS[1], RECORDS[2], ""])
    array = tmp_path / "array.json"
    array.write_text("\n" + json.dumps(RECORDS, ensure_ascii=False, indent=2), encoding="utf-8")
    assert _read(lines) == EXPECTED  # blank lines skipped, null -> ""
    assert _read(array) == EXPECTED


def test_utf8_bom_is_accepted(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(RECORDS[0], ensure_ascii=False).encode("utf-8") + b"\n")
    assert _read(path) == EXPECTED[:1]


def test_history_normalized(tmp_path):
    path = write_jsonl(
        tmp_path / "chat.jsonl",
        [
            {"content": "q3", "summary": "a3", "history": [["q1", "a1"], ["q2", "a2"]]},
            {"content": "q", "summary": "a"},  # no history field
            {"content": "q", "summary": "a", "history": None},
            {"content": "q", "summary": "a", "history": []},
        ],
    )
    records = _read(path, history_column="history")
    assert records[0]["history"] == [["q1", "a1"], ["q2", "a2"]]
    assert [r["history"] for r in records[1:]] == [[], [], []]
    # without --history_column the field is ignored
    assert all(r["history"] == [] for r in _read(path))


# ----------------------------------------------------------------------------- DataError messages


def test_malformed_json_names_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [RECORDS[0], "", '{"content": "x", "summary": }', RECORDS[0]])
    message = _error(path)
    assert f"{path}:3:" in message  # physical line 3 (the blank line counts)
    assert "invalid JSON" in message


def test_json_array_non_object_element(tmp_path):
    path = tmp_path / "array.json"
    path.write_text(json.dumps([RECORDS[0], RECORDS[1], ["not", "an", "object"]]), encoding="utf-8")
    message = _error(path)
    assert str(path) in message
    assert "element 2" in message
    assert "list" in message


def test_invalid_json_array_names_the_line(tmp_path):
    path = tmp_path / "array.json"
    path.write_text('[\n{"content": "a", "summary": "b"},\n{"content": "a" "summary": "b"}\n]\n', encoding="utf-8")
    message = _error(path)
    assert f"{path}:3:" in message


def test_missing_prompt_column_lists_fields_present(tmp_path):
    path = write_jsonl(tmp_path / "cols.jsonl", [RECORDS[0], {"title": "t", "summary": "s"}])
    message = _error(path)
    assert f"{path}:2:" in message
    assert "'content'" in message and "--prompt_column" in message
    assert "fields present: summary, title" in message


def test_missing_response_column(tmp_path):
    path = write_jsonl(tmp_path / "cols.jsonl", [{"content": "c", "answer": "s"}])
    message = _error(path)
    assert f"{path}:1:" in message
    assert "'summary'" in message and "--response_column" in message
    assert "answer, content" in message


@pytest.mark.parametrize(
    "record, field, type_name",
    [
        ({"content": 42, "summary": "s"}, "content", "int"),
        ({"content": "c", "summary": ["a", "b"]}, "summary", "list"),
    ],
)
def test_non_string_value(tmp_path, record, field, type_name):
    path = write_jsonl(tmp_path / "types.jsonl", [RECORDS[0], RECORDS[1], record])
    message = _error(path)
    assert f"{path}:3:" in message
    assert f"'{field}'" in message
    assert type_name in message


@pytest.mark.parametrize(
    "history",
    ["q1 a1", [["q1", "a1", "extra"]], [["q1", 7]], [["q1", "a1"], "q2"]],
    ids=["string", "triple", "non-string-member", "non-pair-member"],
)
def test_history_of_wrong_shape(tmp_path, history):
    path = write_jsonl(
        tmp_path / "chat.jsonl",
        [
            {"content": "q", "summary": "a", "history": [["x", "y"]]},
            {"content": "q", "summary": "a", "history": history},
        ],
    )
    message = _error(path, history_column="history")
    assert f"{path}:2:" in message
    assert "'history'" in message
    assert "[query, answer] pairs" in message


def test_non_utf8_bytes_name_the_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    good = json.dumps(RECORDS[0], ensure_ascii=False).encode("utf-8")
    path.write_bytes(good + b"\n" + '{"content": "caf\u00e9", "summary": "x"}'.encode("latin-1") + b"\n")
    message = _error(path)
    assert f"{path}:2:" in message
    assert "UTF-8" in message


def test_non_utf8_bytes_after_a_bom_name_the_right_line(tmp_path):
    path = tmp_path / "bom-latin1.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"content": "a", "summary": "b"}\n' + b'\xff{"content": "c", "summary": "d"}\n')
    message = _error(path)
    assert f"{path}:2:" in message


def test_line_separator_inside_a_string_is_not_a_line_break(tmp_path):
    record = {"content": "第一段\u2028第二段", "summary": "下一行\u0085结束"}
    path = write_jsonl(tmp_path / "ls.jsonl", [record, RECORDS[0]])
    assert "\u2028" in path.read_text(encoding="utf-8")  # written raw, as json.dumps(ensure_ascii=False) does
    assert _read(path) == [{"prompt": record["content"], "response": record["summary"], "history": []}, EXPECTED[0]]


@pytest.mark.parametrize("content", ["", "\n\n  \n\t\n"], ids=["empty", "blank-lines"])
def test_file_without_records(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_text(content, encoding="utf-8")
    message = _error(path)
    assert str(path) in message
    assert "no records" in message


# ----------------------------------------------------------------------------- load_split


def test_load_split_returns_a_dataset(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", RECORDS)
    dataset = load_split(str(path), _args())
    assert isinstance(dataset, datasets.Dataset)
    assert sorted(dataset.column_names) == sorted(FEATURES)
    assert [_pairs(row) for row in dataset] == EXPECTED


def test_load_split_with_history_column(tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"p": "q2", "r": "a2", "h": [["q1", "a1"]]}, {"p": "q", "r": "a"}])
    dataset = load_split(str(path), _args(prompt_column="p", response_column="r", history_column="h"))
    assert [_pairs(row) for row in dataset] == [
        {"prompt": "q2", "response": "a2", "history": [["q1", "a1"]]},
        {"prompt": "q", "response": "a", "history": []},
    ]


def test_load_split_reraises_data_error(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [RECORDS[0], "{oops", RECORDS[1]])
    with pytest.raises(DataError) as info:
        load_split(str(path), _args())
    assert type(info.value) is DataError  # not datasets' DatasetGenerationError wrapper
    assert f"{path.resolve()}:2:" in str(info.value)


def test_load_split_sees_a_rewritten_file(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", RECORDS[:2])
    first = [_pairs(row)["prompt"] for row in load_split(str(path), _args())]
    assert first == ["类型#裤*颜色#红", "类型#裙"]
    assert [_pairs(row)["prompt"] for row in load_split(str(path), _args())] == first  # cached, unchanged

    before = os.stat(path)
    write_jsonl(path, [{"content": "新的", "summary": "内容"}, {"content": "第二", "summary": "行"}, RECORDS[0]])
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns + 2_000_000_000))
    after = os.stat(path)
    assert after.st_mtime_ns != before.st_mtime_ns and after.st_size != before.st_size

    second = [_pairs(row) for row in load_split(str(path), _args())]
    assert [row["prompt"] for row in second] == ["新的", "第二", "类型#裤*颜色#红"]
    assert [row["response"] for row in second] == ["内容", "行", "一条红裤子。"]


# ----------------------------------------------------------------------------- Encoder


def _encode(tokenizer, rows, train, template="chatglm2", max_source_length=64, max_target_length=16, prefix=""):
    fmt = PromptFormat(template, tokenizer, prefix)
    encoder = Encoder(PromptEncoder(tokenizer, fmt, max_source_length), max_target_length, train)
    return encoder(encoder_batch(rows))


def test_training_labels_mask_the_prompt_exactly(tokenizer):
    prompt, answer = "类型#裤*颜色#红", "一条红色的裤子。"
    out = _encode(tokenizer, [(prompt, answer)], train=True)
    ids, labels = out["input_ids"][0], out["labels"][0]
    prompt_ids = tokenizer.encode(f"[Round 1]\n\n问：{prompt}{CUE}")
    answer_ids = tokenizer.encode(answer, add_special_tokens=False)
    eos = tokenizer.eos_token_id
    assert ids == prompt_ids + answer_ids + [eos]
    assert len(labels) == len(ids)
    n = len(prompt_ids)
    assert labels[:n] == [IGNORE_INDEX] * n
    assert labels[n:] == ids[n:] == answer_ids + [eos]
    assert IGNORE_INDEX not in labels[n:]
    assert labels[-1] == eos
    assert out["history_dropped"] == out["query_cut"] == out["target_truncated"] == [False]


def test_eval_encoding_is_prompt_only_with_answer_labels(tokenizer):
    prompt, answer = "类型#裙*颜色#白", "这款白色连衣裙清新自然，简约的版型适合通勤也适合约会，" * 2
    out = _encode(tokenizer, [(prompt, answer)], train=False, max_target_length=8)
    answer_ids = tokenizer.encode(answer, add_special_tokens=False)
    assert len(answer_ids) > 8
    assert out["input_ids"][0] == tokenizer.encode(f"[Round 1]\n\n问：{prompt}{CUE}")
    assert out["labels"][0] == answer_ids[:8]
    assert tokenizer.eos_token_id not in out["labels"][0]
    assert out["target_truncated"] == [True]


@pytest.mark.parametrize("max_source_length", [4, 9, 20, 33])
def test_long_query_loses_its_start_but_keeps_the_text_before_it_and_the_cue(tokenizer, max_source_length):
    full = tokenizer.encode(f"{HEAD}{LONG_TEXT}{CUE}")
    head = tokenizer.encode(HEAD, add_special_tokens=False)
    cue = tokenizer.encode(CUE, add_special_tokens=False)
    assert full[: len(head)] == head and full[-len(cue) :] == cue and len(full) > 2 * max_source_length
    out = _encode(tokenizer, [(LONG_TEXT, "好看。")], train=False, max_source_length=max_source_length)
    ids = out["input_ids"][0]
    assert len(ids) == max_source_length
    # A budget too small for the round header and the cue gives the cue (its end) at most half.
    keep_cue = min(len(cue), max_source_length // 2)
    keep_head = min(len(head), max_source_length - keep_cue)
    assert ids == full[:keep_head] + full[len(full) - (max_source_length - keep_head) :]
    if max_source_length >= len(head) + len(cue):
        assert ids[: len(head)] == head and ids[-len(cue) :] == cue  # the round header and the cue, whole
        assert tokenizer.decode(ids[len(head) : -len(cue)]) in LONG_TEXT  # the end of the query
        assert LONG_TEXT.endswith(tokenizer.decode(ids[len(head) : -len(cue)]))
    assert out["query_cut"] == [True] and out["history_dropped"] == [False]


LONG_ROUND = ["上一轮的问题" * 6, "上一轮的回答，比较长的一段话" * 4]


def _history_rounds(n):
    return [[f"第{i}轮：{LONG_ROUND[0]}", f"第{i}轮：{LONG_ROUND[1]}"] for i in range(1, n + 1)]


def test_long_history_loses_its_oldest_rounds_and_keeps_the_current_query(tokenizer, tmp_path, caplog):
    """Issue 17: with a long history the current query must stay whole; the oldest rounds go first."""
    query, history = "这一轮真正要回答的问题", _history_rounds(3)
    path = write_jsonl(
        tmp_path / "chat.jsonl",
        [
            {"prompt": query, "response": "回答。", "history": history},
            {"prompt": "短问题", "response": "短回答。", "history": history[:1]},
        ],
    )
    last_round = f"[Round 1]\n\n问：{history[2][0]}\n\n答：{history[2][1]}\n\n[Round 2]\n\n问：{query}{CUE}"
    two_rounds = f"[Round 1]\n\n问：{history[1][0]}\n\n答：{history[1][1]}\n\n" + last_round.replace(
        "[Round 2]", "[Round 3]"
    ).replace("[Round 1]", "[Round 2]")
    limit = len(tokenizer.encode(last_round))
    assert len(tokenizer.encode(two_rounds)) > limit  # so exactly the two oldest rounds must go
    data_args = _args(prompt_column="prompt", response_column="response", history_column="history")
    data_args.max_source_length = limit
    with caplog.at_level(logging.WARNING, logger="glmtune.data"):
        encoded = tokenize(load_split(str(path), data_args), tokenizer, PromptFormat("chatglm2"), data_args, "train")
    expected_prompt = tokenizer.encode(last_round)
    answer = tokenizer.encode("回答。", add_special_tokens=False) + [tokenizer.eos_token_id]
    assert encoded[0]["input_ids"] == expected_prompt + answer
    assert encoded[0]["labels"] == [IGNORE_INDEX] * len(expected_prompt) + answer
    assert encoded["history_dropped"] == [True, False] and encoded["query_cut"] == [False, False]
    assert "train: 1 of 2 samples were too long and lost their oldest history rounds" in caplog.text
    assert "start of the query was cut" not in caplog.text


def test_a_query_too_long_alone_loses_its_start_after_all_history(tokenizer):
    rows = [(LONG_TEXT, "好看。", _history_rounds(2))]
    out = _encode(tokenizer, rows, train=False, max_source_length=24)
    ids = out["input_ids"][0]
    head = tokenizer.encode(HEAD, add_special_tokens=False)  # no history left: round 1 again
    cue = tokenizer.encode(CUE, add_special_tokens=False)
    assert len(ids) == 24 and ids[: len(head)] == head and ids[-len(cue) :] == cue
    assert LONG_TEXT.endswith(tokenizer.decode(ids[len(head) : -len(cue)]))
    assert out["history_dropped"] == [True] and out["query_cut"] == [True]


def test_system_text_is_kept_before_the_query_when_history_is_dropped(tokenizer):
    row = conversation_row("问题", "回答。", _history_rounds(2), system="你是一个助手")
    expected = tokenizer.encode(f"[Round 1]\n\n问：你是一个助手\n\n问题{CUE}")
    out = _encode(tokenizer, [row], train=False, max_source_length=len(expected))
    assert out["input_ids"][0] == expected
    assert out["history_dropped"] == [True] and out["query_cut"] == [False]


def test_long_prompt_with_chat_template_keeps_the_generation_prompt(tokenizer):
    import copy

    chat = copy.deepcopy(tokenizer)
    chat.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
    )
    out = _encode(chat, [(LONG_TEXT, "好看。")], train=True, template="chat_template", max_source_length=24)
    ids, labels = out["input_ids"][0], out["labels"][0]
    cue = chat.encode("\n<|assistant|>\n", add_special_tokens=False)
    assert ids[24 - len(cue) : 24] == cue
    assert ids[0] == chat.convert_tokens_to_ids("<|user|>")
    assert labels[:24] == [IGNORE_INDEX] * 24
    assert ids[24:] == labels[24:] == chat.encode("好看。", add_special_tokens=False) + [chat.eos_token_id]


def test_long_answer_is_cut_to_max_target_length_plus_eos(tokenizer):
    answer = "这款裤子采用雪纺面料，垂感很好，宽松的版型包容性强，" * 3
    answer_ids = tokenizer.encode(answer, add_special_tokens=False)
    assert len(answer_ids) > 16
    out = _encode(tokenizer, [("类型#裤", answer)], train=True, max_target_length=16)
    prompt_len = len(tokenizer.encode(f"[Round 1]\n\n问：类型#裤{CUE}"))
    ids, labels = out["input_ids"][0], out["labels"][0]
    assert len(ids) == prompt_len + 16 + 1
    assert labels[prompt_len:] == answer_ids[:16] + [tokenizer.eos_token_id]
    assert out["target_truncated"] == [True] and out["query_cut"] == [False]


def test_history_goes_into_the_prompt(tokenizer, tmp_path):
    path = write_jsonl(
        tmp_path / "chat.jsonl",
        [
            {"prompt": "第二问", "response": "第二答", "history": [["第一问", "第一答"]]},
        ],
    )
    data_args = _args(
        prompt_column="prompt", response_column="response", history_column="history", max_source_length=128
    )
    dataset = load_split(str(path), data_args)
    encoded = tokenize(dataset, tokenizer, PromptFormat("chatglm2", tokenizer), data_args, "train")
    row = encoded[0]
    prompt_ids = tokenizer.encode("[Round 1]\n\n问：第一问\n\n答：第一答\n\n[Round 2]\n\n问：第二问\n\n答：")
    n = len(prompt_ids)
    assert row["input_ids"][:n] == prompt_ids
    assert row["labels"][:n] == [IGNORE_INDEX] * n  # the earlier answer is context, not a target
    assert row["labels"][n:] == tokenizer.encode("第二答", add_special_tokens=False) + [tokenizer.eos_token_id]


# ----------------------------------------------------------------------------- tokenize


ROWS_WITH_EMPTY = [
    ("类型#裤", "裤子。"),
    ("", "没有问题"),
    ("类型#裙", ""),
    ("类型#衫", "衬衫。"),
    ("类型#鞋", "鞋子。"),
]


def test_tokenize_train_drops_empty_rows_and_logs(tokenizer, caplog):
    data_args = _args()
    with caplog.at_level(logging.WARNING, logger="glmtune.data"):
        encoded = tokenize(_dataset(ROWS_WITH_EMPTY), tokenizer, PromptFormat("chatglm2"), data_args, "train")
    assert len(encoded) == 3
    assert "train: skipped 2 of 5 rows whose prompt or response is empty" in caplog.text
    expected_prompts = [tokenizer.encode(f"[Round 1]\n\n问：{p}{CUE}") for p in ("类型#裤", "类型#衫", "类型#鞋")]
    for row, prompt_ids in zip(encoded, expected_prompts):
        assert row["input_ids"][: len(prompt_ids)] == prompt_ids


def test_tokenize_predict_keeps_every_row(tokenizer, caplog):
    with caplog.at_level(logging.WARNING, logger="glmtune.data"):
        encoded = tokenize(_dataset(ROWS_WITH_EMPTY), tokenizer, PromptFormat("chatglm2"), _args(), "predict")
    assert len(encoded) == 5
    assert "skipped" not in caplog.text
    assert encoded[1]["input_ids"] == tokenizer.encode(f"[Round 1]\n\n问：{CUE}")
    assert encoded[2]["labels"] == []


def test_tokenize_all_rows_empty_is_an_error(tokenizer):
    with pytest.raises(DataError, match="every row has an empty prompt or response"):
        tokenize(
            _dataset([("", "a"), ("q", "")]), tokenizer, PromptFormat("chatglm2"), _args(train_file="t.json"), "train"
        )


def test_tokenize_logs_truncation_counts(tokenizer, caplog):
    long_answer = "这款裤子采用雪纺面料，垂感很好，宽松的版型包容性强，" * 2  # > 16 tokens
    rows = [(LONG_TEXT, long_answer), (LONG_TEXT, "短。"), ("类型#裤", "短。"), ("类型#裙", "中等长度的一句话回答")]
    medium = len(tokenizer.encode(rows[3][1], add_special_tokens=False))
    assert 8 < medium <= 16  # cut for eval (8) but not for train (16)
    data_args = _args(max_source_length=32)
    with caplog.at_level(logging.WARNING, logger="glmtune.data"):
        train = tokenize(_dataset(rows), tokenizer, PromptFormat("chatglm2"), data_args, "train")
    assert (
        "train: 2 of 4 prompts were longer than max_source_length 32 with no history left: the start of the query"
        in caplog.text
    )
    assert "train: 1 of 4 answers were longer than 16 tokens and were truncated" in caplog.text
    assert "lost their oldest history rounds" not in caplog.text
    assert train["query_cut"] == [True, True, False, False]
    assert all(len(row["input_ids"]) <= 32 + 16 + 1 for row in train)

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="glmtune.data"):
        tokenize(_dataset(rows), tokenizer, PromptFormat("chatglm2"), data_args, "eval")
    assert "eval: 2 of 4 prompts were longer than max_source_length 32" in caplog.text
    assert "eval: 2 of 4 answers were longer than 8 tokens and were truncated" in caplog.text


def test_tokenize_without_truncation_logs_nothing(tokenizer, caplog):
    with caplog.at_level(logging.WARNING, logger="glmtune.data"):
        tokenize(_dataset([("类型#裤", "短。")]), tokenizer, PromptFormat("chatglm2"), _args(), "train")
    assert "truncated" not in caplog.text and "skipped" not in caplog.text


def test_toy_dev_file_end_to_end(tokenizer):
    data_args = _args(max_source_length=64, max_target_length=64, val_max_target_length=64)
    dataset = load_split(str(TOY_DEV), data_args)
    assert len(dataset) == 200
    encoded = tokenize(dataset.select(range(16)), tokenizer, PromptFormat("auto", tokenizer), data_args, "train")
    batch = Collator(tokenizer.pad_token_id, "right")([encoded[i] for i in range(16)])
    first = _pairs(dataset[0])
    prompt_ids = tokenizer.encode(f"[Round 1]\n\n问：{first['prompt']}{CUE}")
    assert batch["input_ids"][0, : len(prompt_ids)].tolist() == prompt_ids
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert batch["input_ids"].shape[1] % 8 == 0
    # every answer token is a target; padding and prompt never are
    assert ((batch["labels"] != IGNORE_INDEX) <= (batch["attention_mask"] == 1)).all()


# ----------------------------------------------------------------------------- Collator


PAD = 1
FEATURES_BATCH = [
    {"input_ids": [5, 6, 7], "labels": [IGNORE_INDEX, 6, 7]},
    {"input_ids": list(range(10, 20)), "labels": [IGNORE_INDEX] * 4 + list(range(14, 20))},
]


def test_collator_right_padding():
    batch = Collator(PAD, "right")(FEATURES_BATCH)
    assert set(batch) == {"input_ids", "attention_mask", "position_ids", "labels"}
    assert all(t.dtype == torch.long and t.shape == (2, 16) for t in batch.values())
    assert batch["input_ids"][0].tolist() == [5, 6, 7] + [PAD] * 13
    assert batch["input_ids"][1].tolist() == list(range(10, 20)) + [PAD] * 6
    assert batch["attention_mask"][0].tolist() == [1] * 3 + [0] * 13
    assert batch["attention_mask"][1].tolist() == [1] * 10 + [0] * 6
    assert batch["labels"][0].tolist() == [IGNORE_INDEX, 6, 7] + [IGNORE_INDEX] * 13
    assert batch["labels"][1].tolist() == [IGNORE_INDEX] * 4 + list(range(14, 20)) + [IGNORE_INDEX] * 6


def test_collator_left_padding():
    batch = Collator(PAD, "left")(FEATURES_BATCH)
    assert batch["input_ids"][0].tolist() == [PAD] * 13 + [5, 6, 7]
    assert batch["input_ids"][1].tolist() == [PAD] * 6 + list(range(10, 20))
    assert batch["attention_mask"][0].tolist() == [0] * 13 + [1] * 3
    assert batch["attention_mask"][1].tolist() == [0] * 6 + [1] * 10
    assert batch["labels"][0].tolist() == [IGNORE_INDEX] * 13 + [IGNORE_INDEX, 6, 7]
    assert batch["labels"][1].tolist() == [IGNORE_INDEX] * 6 + [IGNORE_INDEX] * 4 + list(range(14, 20))


@pytest.mark.parametrize("side", ["right", "left"])
def test_collator_positions_count_real_tokens_from_0(side):
    batch = Collator(PAD, side)(FEATURES_BATCH)
    for row, feature in enumerate(FEATURES_BATCH):
        real = batch["attention_mask"][row] == 1
        assert batch["position_ids"][row][real].tolist() == list(range(len(feature["input_ids"])))
        assert (batch["position_ids"][row] >= 0).all()


def test_collator_mask_is_zero_exactly_on_padding_even_when_pad_is_a_real_token():
    features = [{"input_ids": [PAD, 8, PAD], "labels": [PAD, 8, PAD]}, {"input_ids": [9], "labels": [9]}]
    for side in ("right", "left"):
        batch = Collator(PAD, side)(features)
        mask = batch["attention_mask"]
        assert mask.sum(dim=1).tolist() == [3, 1]
        real = slice(0, 3) if side == "right" else slice(5, 8)
        assert batch["input_ids"][0, real].tolist() == [PAD, 8, PAD]
        assert mask[0, real].tolist() == [1, 1, 1]
        assert batch["labels"][0, real].tolist() == [PAD, 8, PAD]  # real label ids are never replaced


def test_collator_eval_labels_padded_on_their_own():
    features = [{"input_ids": list(range(2, 13)), "labels": [3, 4]}, {"input_ids": [2, 3], "labels": [5, 6, 7]}]
    batch = Collator(PAD, "left")(features)
    assert batch["input_ids"].shape == (2, 16)
    assert batch["labels"].shape == (2, 8)
    assert batch["labels"][0].tolist() == [IGNORE_INDEX] * 6 + [3, 4]


@pytest.mark.parametrize("longest, padded", [(1, 8), (7, 8), (8, 8), (9, 16), (17, 24)])
def test_collator_rounds_up_to_a_multiple_of_8(longest, padded):
    features = [{"input_ids": [3] * longest, "labels": [3] * longest}, {"input_ids": [4], "labels": [4]}]
    batch = Collator(PAD, "right")(features)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (2, padded)
    assert batch["attention_mask"][0].sum().item() == longest


def test_collator_other_multiple():
    batch = Collator(PAD, "right", pad_to_multiple_of=1)(FEATURES_BATCH)
    assert batch["input_ids"].shape == (2, 10)
