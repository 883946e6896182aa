"""Fuzzing reading and prompt building: clear DataErrors or success, never another exception."""

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from glmtune.encoding import PromptEncoder
from glmtune.errors import DataError
from glmtune.prompt import PromptFormat
from glmtune.records import detect_format, read_records

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=8,
)
FIELDS = ["content", "summary", "history", "instruction", "input", "output", "system", "tools", "other"]
messages = st.lists(
    st.dictionaries(st.sampled_from(["role", "content", "name", "parameters", "observation"]), json_values)
    | st.fixed_dictionaries(
        {"role": st.sampled_from(["system", "user", "assistant", "observation", "tool", "x"]), "content": json_values}
    ),
    max_size=4,
)
records = st.dictionaries(
    st.sampled_from(FIELDS) | st.text(max_size=6), json_values, max_size=5
) | st.fixed_dictionaries({}, optional={"conversations": messages, "messages": messages, "tools": json_values})
DATA_FORMATS = ["prompt_response", "alpaca", "conversations", "messages", None]  # None: detected


def read_or_data_error(path, data_format="prompt_response", history_column="history"):
    try:
        return list(
            read_records(str(path), data_format or detect_format(str(path)), ("content", "summary", history_column))
        )
    except DataError as error:
        assert str(path) in str(error)  # every message names the file
        return None


@FAST
@given(
    rows=st.lists(records | json_values, max_size=5), as_array=st.booleans(), data_format=st.sampled_from(DATA_FORMATS)
)
def test_any_json_gives_records_or_a_data_error(tmp_path_factory, rows, as_array, data_format):
    path = tmp_path_factory.mktemp("fuzz") / "data.json"
    text = (
        json.dumps(rows, ensure_ascii=False) if as_array else "\n".join(json.dumps(r, ensure_ascii=False) for r in rows)
    )
    path.write_text(text, encoding="utf-8")
    for row in read_or_data_error(path, data_format) or []:
        roles = [message["role"] for message in row["messages"]]
        assert roles[0] == "user" and roles[-1] == "assistant"  # what the prompt formats rely on
        assert all(isinstance(message["content"], str) for message in row["messages"])


@FAST
@given(raw=st.binary(max_size=200))
def test_any_bytes_give_records_or_a_data_error(tmp_path_factory, raw):
    path = tmp_path_factory.mktemp("fuzz") / "data.jsonl"
    path.write_bytes(raw)
    read_or_data_error(path)


@FAST
@given(
    query=st.text(max_size=40),
    history=st.lists(st.tuples(st.text(max_size=20), st.text(max_size=20)), max_size=3),
    template=st.sampled_from(["chatglm2", "chatglm", "raw"]),
    prefix=st.text(max_size=5),
)
def test_any_text_builds_a_prompt_and_fits_max_source_length(tokenizer, query, history, template, prefix):
    history = [] if template == "raw" else [list(pair) for pair in history]
    prompt_format = PromptFormat(template, tokenizer, prefix)
    text = prompt_format.render(query, history)
    assert query in text
    ids, _ = PromptEncoder(tokenizer, prompt_format, 16).encode(query, history)
    # empty only when the query alone writes nothing (chatglm, raw), its history dropped to fit
    assert len(ids) <= 16 and (len(ids) > 0 or prompt_format.render(query) == "")


@FAST
@given(
    text=st.text(alphabet=st.sampled_from('a,"\t\n\r[]q'), max_size=60),
    suffix=st.sampled_from([".csv", ".tsv"]),
    data_format=st.sampled_from(["prompt_response", "alpaca", None]),
)
def test_any_csv_or_tsv_text_gives_records_or_a_data_error(tmp_path_factory, text, suffix, data_format):
    path = tmp_path_factory.mktemp("fuzz") / f"data{suffix}"
    delimiter = "\t" if suffix == ".tsv" else ","
    path.write_text(delimiter.join(["content", "summary", "history", "instruction", "output"]) + "\n" + text)
    read_or_data_error(path, data_format)
