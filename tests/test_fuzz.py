"""Fuzzing reading and prompt building: clear DataErrors or success, never another exception."""

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from glmtune.data import PromptEncoder, read_records
from glmtune.errors import DataError
from glmtune.prompt import PromptFormat

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=8,
)
records = st.dictionaries(
    st.sampled_from(["content", "summary", "history", "other"]) | st.text(max_size=6), json_values, max_size=5
)


def read_or_data_error(path, history_column="history"):
    try:
        return list(read_records(str(path), "content", "summary", history_column))
    except DataError as error:
        assert str(path) in str(error)  # every message names the file
        return None


@FAST
@given(rows=st.lists(records | json_values, max_size=5), as_array=st.booleans())
def test_any_json_gives_records_or_a_data_error(tmp_path_factory, rows, as_array):
    path = tmp_path_factory.mktemp("fuzz") / "data.json"
    text = (
        json.dumps(rows, ensure_ascii=False) if as_array else "\n".join(json.dumps(r, ensure_ascii=False) for r in rows)
    )
    path.write_text(text, encoding="utf-8")
    result = read_or_data_error(path)
    if result is not None:
        assert all(isinstance(r["prompt"], str) and isinstance(r["response"], str) for r in result)


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
    assert len(ids) <= 16 and (len(ids) > 0 or text == "")
