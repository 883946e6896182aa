"""Tokenized data is cached by datasets, and any change of file, tokenizer, template or lengths is a miss."""

import copy

import datasets
import pytest
from conftest import write_jsonl

from glmtune.arguments import DataArguments
from glmtune.data import load_split, tokenize
from glmtune.prompt import PromptFormat

RECORDS = [{"content": f"类型#裙*颜色#{c}", "summary": f"{c}的裙子。"} for c in ("白色", "黑色", "红色")]


@pytest.fixture(autouse=True)
def private_datasets_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-datasets-cache"))
    datasets.disable_progress_bars()


def tokenized(path, tokenizer, template="chatglm2", **lengths):
    args = DataArguments(
        prompt_column="content",
        response_column="summary",
        **{"max_source_length": 64, "max_target_length": 16, **lengths},
    )
    args.val_max_target_length = args.max_target_length
    dataset = tokenize(load_split(str(path), args), tokenizer, PromptFormat(template, tokenizer), args, "train")
    return dataset.cache_files[0]["filename"], dataset["input_ids"]


def test_same_inputs_reuse_the_cache_and_every_change_misses_it(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "train.json", RECORDS)
    first, ids = tokenized(path, tokenizer)
    assert tokenized(path, tokenizer) == (first, ids)  # same file, tokenizer, template, lengths: cached

    assert tokenized(path, tokenizer, max_source_length=8)[0] != first
    assert tokenized(path, tokenizer, max_target_length=4)[0] != first
    assert tokenized(path, tokenizer, template="raw")[0] != first
    other_tokenizer = copy.deepcopy(tokenizer)
    other_tokenizer.add_tokens(["白色的裙子"])
    changed, changed_ids = tokenized(path, other_tokenizer)
    assert changed != first and changed_ids != ids

    write_jsonl(path, RECORDS[:2] + [{"content": "类型#裤", "summary": "裤子。"}])  # same name, new content
    renewed, renewed_ids = tokenized(path, tokenizer)
    assert renewed != first and len(renewed_ids) == 3 and renewed_ids[2] != ids[2]
