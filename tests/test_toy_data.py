"""Tests for scripts/make_toy_data.py and the committed data/adgen-toy files."""

import importlib.util
import json
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "scripts" / "make_toy_data.py"
DATA_DIR = REPO_ROOT / "data" / "adgen-toy"
EXPECTED_ROWS = {"train.json": 2000, "dev.json": 200}


def _load_module():
    spec = importlib.util.spec_from_file_location("make_toy_data", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _read(name):
    with open(DATA_DIR / name, encoding="utf-8", newline="") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def records():
    return {name: _read(name) for name in EXPECTED_ROWS}


def test_regenerate_is_byte_identical(tmp_path):
    mod = _load_module()
    mod.main(["--out-dir", str(tmp_path)])  # all other args at their defaults
    for name in EXPECTED_ROWS:
        assert (tmp_path / name).read_bytes() == (DATA_DIR / name).read_bytes(), name


def test_generate_api():
    mod = _load_module()
    train, dev = mod.generate(50, 10, 7)
    assert len(train) == 50 and len(dev) == 10
    assert mod.generate(50, 10, 7) == (train, dev)  # deterministic
    assert mod.generate(50, 10, 8) != (train, dev)  # seed matters


def test_row_counts_and_format():
    for name, n in EXPECTED_ROWS.items():
        raw = (DATA_DIR / name).read_bytes()
        assert b"\r" not in raw
        lines = raw.decode("utf-8").split("\n")
        assert lines[-1] == ""  # file ends with a newline
        lines = lines[:-1]
        assert len(lines) == n
        for line in lines:
            rec = json.loads(line)
            assert list(rec) == ["content", "summary"]
            assert isinstance(rec["content"], str) and isinstance(rec["summary"], str)
            assert line == json.dumps(rec, ensure_ascii=False)


def test_summary_mentions_every_attribute(records):
    for recs in records.values():
        for rec in recs:
            pairs = [p.split("#") for p in rec["content"].split("*")]
            assert all(len(p) == 2 for p in pairs), rec["content"]
            assert pairs[0][0] == "类型" and pairs[0][1] in ("上衣", "裙", "裤")
            assert 4 <= len(pairs) <= 8  # 类型 + 3..7 attributes
            keys = [k for k, _ in pairs]
            assert len(keys) == len(set(keys))
            for _, value in pairs:
                assert value in rec["summary"], (value, rec)


def test_train_dev_disjoint(records):
    train = {r["content"] for r in records["train.json"]}
    dev = [r["content"] for r in records["dev.json"]]
    assert not train.intersection(dev)


def test_summaries_varied_and_sized(records):
    for recs in records.values():
        summaries = [r["summary"] for r in recs]
        assert len(set(summaries)) >= 0.9 * len(summaries)
        for s in summaries:
            assert 20 <= len(s) <= 200, s
