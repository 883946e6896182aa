"""glmtune's ChatGLM-6B / ChatGLM2-6B / ChatGLM3-6B tokenizers against the original code's outputs.

Every entry of shared/golden/tokenizers/*.json must be reproduced exactly, on the real tokenizer files of
shared/tokenizers: per test string the ids with and without special tokens, tokens, the three decodes,
the round trip and the ``tokenizer(s)`` output; special tokens, probes, batch padding and the prompts the
original ``chat()`` built. Then saving/reloading, and telling the three apart from a folder's files.
"""

import functools
import hashlib
import json
import shutil

import pytest
from conftest import GOLDEN, SHARED, needs_shared

from glmtune.chatglm.tokenization import (
    VERSION_KEY,
    ChatGLM2Tokenizer,
    ChatGLM3Tokenizer,
    ChatGLMTokenizer,
    detect_version,
    is_chatglm_tokenizer_folder,
    load_chatglm_tokenizer,
)
from glmtune.errors import GlmtuneError

TOKENIZERS, GOLDEN_TOKENIZERS = SHARED / "tokenizers", GOLDEN / "tokenizers"
# golden file -> (folder in shared/tokenizers, loader arguments)
CASES = {
    "chatglm-6b": ("chatglm-6b", {}),
    "chatglm2-6b": ("chatglm2-6b", {}),
    "chatglm3-6b": ("chatglm3-6b", {}),
    "chatglm3-6b_variant_2024copy": ("chatglm3-6b", {"v3_variant": "2024-06"}),
}
AVAILABLE = all(
    (GOLDEN_TOKENIZERS / f"{name}.json").is_file() and (TOKENIZERS / folder).is_dir()
    for name, (folder, _) in CASES.items()
)
pytestmark = needs_shared
V3_CASES = ["chatglm3-6b", "chatglm3-6b_variant_2024copy"]


@functools.cache
def golden(name: str) -> dict:
    return json.loads((GOLDEN_TOKENIZERS / f"{name}.json").read_text(encoding="utf-8"))


@functools.cache
def tokenizer(name: str, **extra):
    folder, kwargs = CASES[name]
    return load_chatglm_tokenizer(TOKENIZERS / folder, **kwargs, **extra)


def plain(value):
    """Lists of numpy arrays / tensors as nested Python lists, to compare with JSON."""
    if isinstance(value, list):
        return [plain(item) for item in value]
    return value.tolist() if hasattr(value, "tolist") else value


def string_cases():
    if not AVAILABLE:  # one case, skipped by pytestmark with the reason
        return [pytest.param("", 0, id="shared-missing")]
    return [
        pytest.param(name, i, id=f"{name}-{i:02d}-{ascii(entry['text'])[1:21]}")
        for name in CASES
        for i, entry in enumerate(golden(name)["strings"])
    ]


@pytest.mark.parametrize("name, index", string_cases())
def test_string_matches_original(name, index):
    want = golden(name)["strings"][index]
    tok, text = tokenizer(name), want["text"]
    ids = tok.encode(text, add_special_tokens=False)
    got = {
        "ids_no_special": ids,
        "ids_with_special": tok.encode(text),
        "tokens_no_special": tok.convert_ids_to_tokens(ids),
        "tokenize": tok.tokenize(text),
        "decode_no_special": tok.decode(want["ids_no_special"]),
        "decode_with_special": tok.decode(want["ids_with_special"]),
        "decode_with_special_skip": tok.decode(want["ids_with_special"], skip_special_tokens=True),
        "roundtrip_exact": tok.decode(ids) == text,
        "raw_sentencepiece_ids": tok.sp.encode(text),
        "raw_sentencepiece_pieces": tok.sp.EncodeAsPieces(text),
        "call_output": {key: plain(value) for key, value in tok(text).items()},
    }
    if "v3_encode_special_tokens_true_ids_no_special" in want:
        got["v3_encode_special_tokens_true_ids_no_special"] = tokenizer(name, encode_special_tokens=True).encode(
            text, add_special_tokens=False
        )
    assert got == {key: value for key, value in want.items() if key != "text"}


@pytest.mark.parametrize("name", list(CASES))
def test_sizes_and_model_file(name):
    want, tok = golden(name), tokenizer(name)
    folder = TOKENIZERS / CASES[name][0]
    assert (len(tok), tok.vocab_size, tok.sp.vocab_size(), tok.padding_side) == (
        want["len(tokenizer)"],
        want["tokenizer.vocab_size"],
        want["sentencepiece_vocab_size"],
        want["padding_side"],
    )
    assert hashlib.sha256((folder / want["tokenizer_file"]).read_bytes()).hexdigest() == want["tokenizer_file_sha256"]


@pytest.mark.parametrize("name", list(CASES))
def test_special_tokens(name):
    want, tok = dict(golden(name)["special_tokens"]), tokenizer(name)
    config = want.pop("config.json", None) or want.pop("config.json(chatglm-6b)")
    got = {}
    for key, value in want.items():
        if key.startswith("tok."):
            got[key] = getattr(tok, key[4:])
        elif key == "tokenizer.special_tokens":
            got[key] = tok.special_token_ids
        elif key == "sp_model.vocab_size()":
            got[key] = tok.sp.vocab_size()
        elif isinstance(tok, ChatGLMTokenizer):
            got[key] = tok.convert_tokens_to_ids(key)
        elif isinstance(value, str) and value.startswith("error:"):
            with pytest.raises(KeyError, match="is not a special token"):
                tok.get_command(key)
            got[key] = value
        else:
            got[key] = tok.get_command(key)
    assert got == want
    # the model's config.json agrees with the tokenizer, and its vocabulary covers it
    for key, value in config.items():
        if key.endswith("vocab_size"):
            assert value >= len(tok)
        else:
            assert getattr(tok, key) == value, key


@pytest.mark.parametrize("name", list(CASES))
def test_id_to_token_probes(name):
    tok = tokenizer(name)
    probes = golden(name)["id_to_token_probe"]
    assert {i: tok.convert_ids_to_tokens(int(i)) for i in probes} == probes


@pytest.mark.parametrize("name", list(CASES))
def test_batch_padding(name):
    want, tok = golden(name)["batch_padding_example"], tokenizer(name)
    out = tok(want["texts"], padding=True)
    assert {key: plain(out[key]) for key in out} == {key: value for key, value in want.items() if key != "texts"}
    tensors = tok(want["texts"], padding=True, return_tensors="pt")
    assert tensors["input_ids"].tolist() == want["input_ids"]
    assert tensors["position_ids"].tolist() == want["position_ids"]


def test_v1_chat_prompts():
    """ChatGLM-6B's chat() tokenizes its round-template prompt as a batch of one: input_ids only."""
    chat, tok = golden("chatglm-6b")["chat"], tokenizer("chatglm-6b")
    for case in ("no_history", "history_1_round"):
        out = tok([chat[case]["prompt_string_(as_built_in_chat)"]], return_tensors="pt")
        assert list(out) == ["input_ids"]
        assert out["input_ids"].tolist() == chat[case]["input_ids"], case
        assert tok.decode(out["input_ids"][0]) == chat[case]["decoded_input"], case


def test_v2_build_prompt():
    chat, tok = golden("chatglm2-6b")["chat"], tokenizer("chatglm2-6b")
    for case, history in (("no_history", []), ("history_1_round", chat["history"])):
        want = chat[case]
        prompt = tok.build_prompt(chat["query"], history)
        assert prompt == want["prompt_string_(tokenizer.build_prompt)"]
        out = tok([prompt], return_tensors="pt")
        assert {key: out[key].tolist() for key in out} == {
            k: want[k] for k in ("input_ids", "attention_mask", "position_ids")
        }
        assert tok.decode(out["input_ids"][0]) == want["decoded_input"]


@pytest.mark.parametrize("name", V3_CASES)
def test_v3_build_chat_input(name):
    chat, tok = golden(name)["chat"], tokenizer(name)
    rounds = chat["history_1_round"]["history_arg"]
    cases = {
        "no_history": (chat["query"], None, "user"),
        "history_1_round": (chat["query"], rounds, "user"),
        "system_plus_history_1_round": (chat["query"], chat["system_plus_history_1_round"]["history_arg"], "user"),
        "observation_role": ('{"result": 42}', rounds, "observation"),
    }
    for case, (query, history, role) in cases.items():
        want = chat[case]
        out = tok.build_chat_input(query, history, role)
        assert {key: out[key].tolist() for key in out} == {
            k: want[k] for k in ("input_ids", "attention_mask", "position_ids")
        }, case
        assert want.get("build_chat_input_ids", want["input_ids"]) == want["input_ids"]
        assert tok.decode(out["input_ids"][0]) == want["decoded_input"], case
        assert [tok.eos_token_id, tok.get_command("<|user|>"), tok.get_command("<|observation|>")] == want[
            "gen_kwarg_eos_token_id"
        ]


@pytest.mark.parametrize("name", V3_CASES)
def test_v3_build_single_message(name):
    want, tok = golden(name)["chat"]["build_single_message_examples"], tokenizer(name)
    assert tok.build_single_message("user", "", "你好") == want["user_你好"]
    assert tok.build_single_message("assistant", "get_weather", '{"city": "北京"}') == want["assistant_meta_tool"]
    assert tok.build_single_message("system", "", "You are a helpful assistant.") == want["system"]
    with pytest.raises(GlmtuneError, match="role 'robot'"):
        tok.build_single_message("robot", "", "hi")


def test_v3_system_tools_are_indented_json():
    tok = tokenizer("chatglm3-6b")
    tools = [{"name": "get_weather", "parameters": {"city": "string"}}]
    out = tok.build_chat_input("hi", [{"role": "system", "content": "Answer.", "tools": tools}])
    content = "Answer.\n" + json.dumps(tools, indent=4, ensure_ascii=False)
    assert out["input_ids"][0].tolist() == [
        64790,
        64792,
        *tok.build_single_message("system", "", content),
        *tok.build_single_message("user", "", "hi"),
        64796,
    ]


def test_special_tokens_added_and_their_mask():
    """v1 appends [gMASK] <sop> (pairs: a [gMASK] <sop> b <eop>); v2/v3 prepend [gMASK] sop (pairs: ... b </s>)."""
    v1, v2 = tokenizer("chatglm-6b"), tokenizer("chatglm2-6b")
    assert v1.build_inputs_with_special_tokens([7, 8], [9]) == [7, 8, 130001, 130004, 9, 130005]
    assert v2.build_inputs_with_special_tokens([7, 8], [9]) == [64790, 64792, 7, 8, 9, 2]
    for tok in (v1, v2, tokenizer("chatglm3-6b")):
        assert (tok.num_special_tokens_to_add(), tok.num_special_tokens_to_add(pair=True)) == (2, 3)
    assert v1("a", "b", return_special_tokens_mask=True)["special_tokens_mask"] == [0, 1, 1, 0, 1]
    assert v2("a", "b", return_special_tokens_mask=True)["special_tokens_mask"] == [1, 1, 0, 0, 1]


def test_v1_protected_special_tokens_eat_surrounding_spaces():
    """Transformers 4.33 never split v1's named special tokens in text and stripped the whitespace around them."""
    tok = tokenizer("chatglm-6b")
    assert tok.encode("你好 \n<eop>  再见", add_special_tokens=False) == (
        tok.encode("你好", add_special_tokens=False) + [130005] + tok.encode("再见", add_special_tokens=False)
    )
    assert tok.tokenize("<sop>x", split_special_tokens=True)[:3] == ["▁<", "s", "op"]


def test_only_v1_cleans_up_tokenization_spaces():
    """ChatGLM-6B's tokenizer left transformers 4.33's default (clean up " ," and the like) on; v2/v3 turned it off."""
    for name, want in (("chatglm-6b", "Hi, there."), ("chatglm2-6b", "Hi , there ."), ("chatglm3-6b", "Hi , there .")):
        tok = tokenizer(name)
        assert tok.decode(tok.encode("Hi , there .", add_special_tokens=False)) == want, name


def test_padding_is_left_only_and_pads_to_multiples():
    tok = tokenizer("chatglm2-6b")
    out = tok(["你好"], padding="max_length", max_length=5)
    assert out["input_ids"] == [[0, 64790, 64792, 36474, 54591]]
    assert (out["attention_mask"], out["position_ids"]) == ([[0, 1, 1, 1, 1]], [[0, 0, 1, 2, 3]])
    assert tok(["你好"], padding=True, pad_to_multiple_of=8)["input_ids"][0][:4] == [0, 0, 0, 0]
    with pytest.raises(GlmtuneError, match="left only"):
        tok(["a", "bb"], padding=True, padding_side="right")


def test_user_added_tokens_get_new_ids_and_stay_whole():
    tok = load_chatglm_tokenizer(TOKENIZERS / "chatglm-6b")
    assert tok.add_tokens(["<extra>"]) == 1
    assert tok.convert_tokens_to_ids("<extra>") == 130344 and len(tok) == 130345
    ids = tok.encode("你好<extra>再见", add_special_tokens=False)
    assert 130344 in ids and tok.decode(ids) == "你好 <extra> 再见"  # 4.33 joined added tokens with spaces
    assert tok.add_tokens(["你好"]) == 0 and tok.tokenize("你好吗") == tok.tokenize("你好吗", split_special_tokens=True)


def test_v1_image_token_offset():
    """The original code shifts text ids by num_image_tokens (0 in the final release's tokenizer_config.json)."""
    tok = ChatGLMTokenizer(str(TOKENIZERS / "chatglm-6b" / "ice_text.model"), num_image_tokens=20000)
    assert tok.encode("你好", add_special_tokens=False) == [20005, 94874] and tok.vocab_size == 150344
    assert (tok.convert_ids_to_tokens(5), tok.convert_tokens_to_ids("<image_7>"), tok.gmask_token_id) == (
        "<image_5>",
        7,
        150001,
    )


@pytest.mark.parametrize(
    "name, cls",
    [("chatglm-6b", ChatGLMTokenizer), ("chatglm2-6b", ChatGLM2Tokenizer), ("chatglm3-6b", ChatGLM3Tokenizer)],
)
def test_save_and_reload(tmp_path, name, cls):
    extra = {"encode_special_tokens": True, "v3_variant": "2024-06"} if cls is ChatGLM3Tokenizer else {}
    original = load_chatglm_tokenizer(TOKENIZERS / CASES[name][0], **extra)
    original.add_tokens(["<extra>"])
    saved = tmp_path / "saved"
    files = original.save_pretrained(saved)
    assert sorted(p.name for p in saved.iterdir()) == sorted(
        ["tokenizer_config.json", cls.vocab_files_names["vocab_file"]]
    )
    assert sorted(map(str, files)) == sorted(str(p) for p in saved.iterdir())
    config = json.loads((saved / "tokenizer_config.json").read_text())
    assert (config["tokenizer_class"], config[VERSION_KEY]) == (cls.__name__, cls.version)
    for reloaded in (load_chatglm_tokenizer(saved), cls.from_pretrained(saved)):
        assert type(reloaded) is cls and is_chatglm_tokenizer_folder(saved)
        for entry in golden(name)["strings"]:
            assert reloaded(entry["text"] + "<extra>") == original(entry["text"] + "<extra>"), entry["text"]
        assert (len(reloaded), reloaded.padding_side) == (len(original), "left")
        for key, value in extra.items():
            assert getattr(reloaded, key) == value


def make_folder(tmp_path, model_file: str, config: dict = None, files: dict = None):
    """A model folder in tmp_path with a copy of a real tokenizer file and the given JSON/text files."""
    folder = tmp_path / "model"
    folder.mkdir()
    source = TOKENIZERS / ("chatglm-6b" if model_file == "ice_text.model" else "chatglm2-6b") / model_file
    shutil.copyfile(source, folder / model_file)
    if config is not None:
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
    for name, text in (files or {}).items():
        (folder / name).write_text(text)
    return folder


def real_config(folder: str) -> dict:
    return json.loads((TOKENIZERS / folder / "tokenizer_config.json").read_text())


@pytest.mark.parametrize(
    "folder, version, cls",
    [
        ("chatglm-6b", "v1", ChatGLMTokenizer),
        ("chatglm2-6b", "v2", ChatGLM2Tokenizer),
        ("chatglm3-6b", "v3", ChatGLM3Tokenizer),
    ],
)
def test_detects_the_real_folders(tmp_path, folder, version, cls):
    model_file = "ice_text.model" if version == "v1" else "tokenizer.model"
    path = make_folder(tmp_path, model_file, real_config(folder))
    assert is_chatglm_tokenizer_folder(path) and detect_version(path) == version
    assert type(load_chatglm_tokenizer(path)) is cls


def test_v2_or_v3_from_remote_code_then_names(tmp_path):
    """The real tokenizer_config.json files differ only in name_or_path; without it the folder's code or
    config.json decide."""
    config = {k: v for k, v in real_config("chatglm3-6b").items() if k != "name_or_path"}
    path = make_folder(tmp_path, "tokenizer.model", config)
    with pytest.raises(GlmtuneError, match=VERSION_KEY):
        detect_version(path)
    (path / "config.json").write_text(json.dumps({"_name_or_path": "THUDM/chatglm3-6b", "model_type": "chatglm"}))
    assert detect_version(path) == "v3"
    (path / "config.json").write_text(json.dumps({"_name_or_path": "THUDM/chatglm2-6b-32k"}))
    assert detect_version(path) == "v2"
    (path / "tokenization_chatglm.py").write_text("def build_chat_input(self, query): ...  # <|user|>\n")
    assert detect_version(path) == "v3"  # the folder's own code outranks the names
    (path / "tokenization_chatglm.py").write_text("def build_prompt(self, query, history=None): ...\n")
    assert detect_version(path) == "v2"
    assert type(load_chatglm_tokenizer(path, version="v3")) is ChatGLM3Tokenizer  # explicit override


def test_v3_2024_code_selects_the_2024_variant(tmp_path):
    code = (
        'special_tokens = ["[MASK]", "[gMASK]", "[sMASK]", "sop", "eop"] + role_special_tokens  # <|user|>\n'
        'self.role_special_token_expression = "|".join([re.escape(token) for token in special_tokens])\n'
    )
    path = make_folder(tmp_path, "tokenizer.model", real_config("chatglm3-6b"), {"tokenization_chatglm.py": code})
    tok = load_chatglm_tokenizer(path, encode_special_tokens=True)
    assert tok.v3_variant == "2024-06" and tok.unk_token_id == 0
    assert tok.encode("[gMASK]sop<|user|>", add_special_tokens=False) == [64790, 64792, 64795]


def test_which_folders_are_chatglm_tokenizers(tmp_path, tiny_model_dir):
    assert not is_chatglm_tokenizer_folder(tiny_model_dir)  # a tokenizer.json folder of another class
    assert not is_chatglm_tokenizer_folder(tmp_path / "missing")
    path = make_folder(tmp_path, "tokenizer.model")
    assert is_chatglm_tokenizer_folder(path)  # a bare SentencePiece file, no tokenizer.json
    (path / "tokenizer.json").write_text("{}")
    assert not is_chatglm_tokenizer_folder(path)
    (path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer"}))
    assert not is_chatglm_tokenizer_folder(path)


def test_bad_folders_and_versions_give_one_clear_error(tmp_path):
    path = make_folder(tmp_path, "tokenizer.model", real_config("chatglm2-6b"))
    with pytest.raises(GlmtuneError, match="needs ice_text.model"):
        load_chatglm_tokenizer(path, version="v1")
    with pytest.raises(GlmtuneError, match="'v4'"):
        load_chatglm_tokenizer(path, version="v4")
    (path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(GlmtuneError, match="tokenizer_config.json: not a readable JSON file"):
        load_chatglm_tokenizer(path)
    (path / "tokenizer_config.json").unlink()
    (path / "tokenizer.model").write_bytes(b"not a model")
    with pytest.raises(GlmtuneError, match="tokenizer.model: not a SentencePiece model"):
        load_chatglm_tokenizer(path, version="v2")
    (path / "tokenizer.model").unlink()
    with pytest.raises(GlmtuneError, match="no ChatGLM tokenizer file"):
        load_chatglm_tokenizer(path)
    with pytest.raises(GlmtuneError, match="v3_variant"):
        load_chatglm_tokenizer(TOKENIZERS / "chatglm3-6b", v3_variant="2025")
