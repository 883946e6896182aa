"""glmtune's prompt formats and token layouts on the real ChatGLM tokenizers, against the originals' ids.

* chat prompts: what the original ``model.chat()`` fed to ``generate()`` (../shared/golden/tokenizers),
  through glmtune's Encoder with ``--prompt_template auto``;
* training layouts: the ``input_ids`` / ``labels`` of the golden ``forward_train`` files (ANCESTORS.md §2:
  v1 prompt + [gMASK, <sop>] + answer + <eop>; v2 [gMASK, sop] + prompt + answer + eos; v3 chat format).
"""

import json

import pytest
import torch
from conftest import GOLDEN, SHARED, encoder_batch, needs_shared
from safetensors.torch import load_file

pytestmark = needs_shared

TOKENIZERS = {"v1": "chatglm-6b", "v2": "chatglm2-6b", "v3": "chatglm3-6b"}
TRAIN_PAIRS = [("你好", "Hi!"), ("类型#裙", "蓝色长裙。")]  # the goldens' training inputs (golden/README.md)


@pytest.fixture(scope="module", params=["v1", "v2", "v3"])
def version(request):
    return request.param


def tokenizer_for(version: str):
    from glmtune.chatglm.tokenization import load_chatglm_tokenizer

    return load_chatglm_tokenizer(str(SHARED / "tokenizers" / TOKENIZERS[version]))


def prompts_for(version: str, template: str = "auto", max_source_length: int = 1024):
    from glmtune.encoding import PromptEncoder
    from glmtune.prompt import PromptFormat

    tokenizer = tokenizer_for(version)
    return PromptEncoder(tokenizer, PromptFormat(template, tokenizer), max_source_length)


def encoder_for(version: str, template: str = "auto", train: bool = False):
    from glmtune.encoding import Encoder

    return Encoder(prompts_for(version, template), 1024, train=train)


def golden_chat(version: str) -> dict:
    return json.loads((GOLDEN / "tokenizers" / f"{TOKENIZERS[version]}.json").read_text(encoding="utf-8"))["chat"]


@pytest.mark.parametrize("case", ["no_history", "history_1_round"])
def test_auto_prompt_is_what_the_original_chat_fed_to_generate(version, case):
    chat = golden_chat(version)
    history = chat["history"] if case == "history_1_round" else []
    ids = prompts_for(version).full_ids(chat["query"], history)
    assert ids == chat[case]["input_ids"][0]


def test_auto_picks_each_versions_own_format(version):
    from glmtune.prompt import PromptFormat

    assert (
        PromptFormat("auto", tokenizer_for(version)).template
        == {"v1": "chatglm", "v2": "chatglm2", "v3": "chatglm3"}[version]
    )


def test_chatglm3_format_needs_the_role_tokens():
    from glmtune.prompt import PromptFormat

    with pytest.raises(ValueError, match="no <|user|>"):
        PromptFormat("chatglm3", tokenizer_for("v2"))


@pytest.mark.parametrize("version_", ["v1", "v2", "v3"])
def test_training_layout_matches_the_golden_forward_train(version_):
    # The goldens train on the raw query (v1/v2) or the chat format (v3), as their ptuning/finetune code does.
    template = {"v1": "chatglm", "v2": "raw", "v3": "chatglm3"}[version_]
    folder = "chatglm-v1" if version_ == "v1" else f"chatglm-{version_}"
    golden = load_file(GOLDEN / folder / "forward_train.safetensors")
    encoder = encoder_for(version_, template, train=True)
    encoded = encoder(encoder_batch(TRAIN_PAIRS))
    pad = encoder.prompts.tokenizer.pad_token_id
    for row, (input_ids, labels) in enumerate(zip(encoded["input_ids"], encoded["labels"])):
        real = golden["input_ids"][row][: len(input_ids)]
        assert input_ids == real.tolist()
        assert (golden["input_ids"][row][len(input_ids) :] == pad).all()  # the rest is padding
        expected = golden["labels"][row][: len(labels)].clone()
        if version_ == "v1":
            # ChatGLM-6B's ptuning also made <sop> (always after [gMASK]) a target; glmtune never trains a
            # token that the prompt fixes, so it is -100 here. Everything else is identical.
            expected[expected == encoder.prompts.tokenizer.convert_tokens_to_ids("<sop>")] = -100
        assert labels == expected.tolist()
        assert (golden["labels"][row][len(labels) :] == -100).all()


def test_truncation_keeps_chatglm6b_trailing_special_tokens():
    encoder = prompts_for("v1", max_source_length=10)
    ids, cut = encoder.encode("类型#裙*颜色#蓝色*风格#清新*图案#条纹", [])
    gmask, sop = encoder.tokenizer.convert_tokens_to_ids(["[gMASK]", "<sop>"])
    assert cut and len(ids) == 10 and ids[-2:] == [gmask, sop]


def test_chatglm3_truncation_keeps_the_assistant_cue():
    encoder = prompts_for("v3", max_source_length=12)
    ids, cut = encoder.encode("类型#裙*颜色#蓝色*风格#清新*图案#条纹", [])
    tokenizer = encoder.tokenizer
    assert cut and len(ids) == 12
    assert ids[:3] == tokenizer.convert_tokens_to_ids(["[gMASK]", "sop", "<|user|>"])
    assert ids[-1] == tokenizer.convert_tokens_to_ids("<|assistant|>")


def test_chatglm3_stops_at_role_tokens_and_they_never_reach_the_text():
    from glmtune.generation import blank_stop_tokens
    from glmtune.prompt import PromptFormat

    tokenizer = tokenizer_for("v3")
    ids = PromptFormat("auto", tokenizer).generation_ids()
    assert ids["eos_token_id"] == [2, 64795, 64797]  # what ChatGLM3's chat() passes to generate()
    answer = tokenizer.encode("\n蓝色长裙", add_special_tokens=False)
    generated = torch.tensor([answer + [64795, 0, 0]])
    assert "<|user|>" in tokenizer.decode(generated[0], skip_special_tokens=True)  # why blanking is needed
    blanked = blank_stop_tokens(generated, ids["eos_token_id"], ids["pad_token_id"])
    assert tokenizer.decode(blanked[0], skip_special_tokens=True).strip() == "蓝色长裙"


@pytest.mark.parametrize("version_", ["v1", "v2", "v3"])
def test_real_adgen_dev_encodes_within_limits_and_answers_decode_back(version_):
    """All 1,070 real ADGEN dev rows (../shared/data), ancestors' 64 + 64 lengths: every sample fits, the answer
    is exactly where the labels are, and an untruncated answer decodes back to its text (v2/v3 tokenizers
    round-trip; ChatGLM-6B's normalises, e.g. '，' -> ',', so only its length is checked)."""
    rows = [json.loads(line) for line in open(SHARED / "data" / "AdvertiseGen" / "dev.json", encoding="utf-8")]
    encoder = encoder_for(version_, train=True)
    encoder.prompts.max_source_length = encoder.max_target_length = 64
    encoded = encoder(encoder_batch([(r["content"], r["summary"]) for r in rows]))
    tokenizer = encoder.prompts.tokenizer
    for row, input_ids, labels, cut in zip(rows, encoded["input_ids"], encoded["labels"], encoded["target_truncated"]):
        assert len(input_ids) == len(labels) <= 64 + 64 + 1
        answer = [token for token in labels if token != -100]
        assert input_ids[len(input_ids) - len(answer) :] == answer and answer[-1] == tokenizer.eos_token_id
        if not cut and version_ != "v1":
            assert tokenizer.decode(answer, skip_special_tokens=True).strip() == row["summary"]
    assert 0 < sum(encoded["target_truncated"]) < len(rows)  # both kinds occur: the decode check above ran
