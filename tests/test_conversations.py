"""Conversations trained on every reply: exact token and label layouts, each checked against a construction
written here from the references (ANCESTORS.md §5 for ChatGLM3, the chat template's own rendering, the round
strings of ChatGLM2), their truncation, and the conversations a format cannot write."""

import copy
import json

import pytest
from conftest import encoder_batch, needs_shared, write_jsonl
from test_prompt import CHAT_TEMPLATE

from glmtune.encoding import Encoder, PromptEncoder
from glmtune.errors import DataError
from glmtune.prompt import PromptFormat
from glmtune.records import read_records

IGNORE = -100


def _rows(tmp_path, record, data_format="conversations") -> list:
    return list(read_records(str(write_jsonl(tmp_path / "c.jsonl", [record])), data_format))


def _encode(tokenizer, template, rows, train=True, max_source_length=1024, max_target_length=1024):
    prompts = PromptEncoder(tokenizer, PromptFormat(template, tokenizer), max_source_length)
    return Encoder(prompts, max_target_length, train)(encoder_batch(rows))


def _turns(*contents) -> list:
    """Alternating user / assistant messages."""
    return [{"role": ("user", "assistant")[i % 2], "content": c} for i, c in enumerate(contents)]


# ----------------------------------------------------------------------------- ChatGLM3 (real tokenizer)

TOOLS = [{"name": "get_weather", "description": "查询城市天气", "parameters": {"city": "string"}}]
CHATGLM3_RECORD = {
    "tools": TOOLS,
    "conversations": [
        {"role": "system", "content": "你是天气助手。"},
        {"role": "user", "content": "北京今天天气怎么样？"},
        {"role": "assistant", "content": "我查一下。"},
        {"role": "tool", "name": "get_weather", "parameters": {"city": "北京"}, "observation": {"temp": 22}},
        {"role": "assistant", "content": "北京今天 22 度，晴。"},
        {"role": "user", "content": "谢谢"},
        {"role": "assistant", "content": "不客气！"},
    ],
}


def _chatglm3_reference(tokenizer, record) -> tuple[list, list]:
    """ChatGLM3 finetune_demo's layout (ANCESTORS §5): [gMASK] sop, then build_single_message per message with a
    loss mask that is False for system / user (and, in glmtune, observation), True otherwise; eos; the masks shifted
    right by one. The tool message is its preprocess_utils pair (a call as assistant + an observation); the tool
    descriptions a first system message, as ChatGLM3's build_chat_input writes them."""
    intro = "Answer the following questions as best as you can. You have access to the following tools:"
    messages = [("system", "", intro + "\n" + json.dumps(record["tools"], indent=4, ensure_ascii=False))]
    for message in record["conversations"]:
        if message["role"] == "tool":
            arguments = ", ".join(f"{k}={v!r}" for k, v in message["parameters"].items())
            messages.append(("assistant", message["name"], f"```python\ntool_call({arguments})\n```"))
            messages.append(("observation", "", json.dumps(message["observation"], ensure_ascii=False)))
        else:
            messages.append((message["role"], "", message["content"]))
    ids, masks = [tokenizer.get_command("[gMASK]"), tokenizer.get_command("sop")], [False, False]
    for role, metadata, content in messages:
        piece = tokenizer.build_single_message(role, metadata, content)
        ids += piece
        masks += [role not in ("system", "user", "observation")] * len(piece)
    ids.append(tokenizer.eos_token_id)
    masks = [False, *masks]
    return ids, [token if mask else IGNORE for token, mask in zip(ids, masks)]


@pytest.fixture(scope="module")
def chatglm3_tokenizer():
    from test_chatglm_prompts import tokenizer_for

    return tokenizer_for("v3")


@needs_shared
def test_chatglm3_conversation_trains_every_reply_as_its_finetune_demo_does(tmp_path, chatglm3_tokenizer):
    encoded = _encode(chatglm3_tokenizer, "auto", _rows(tmp_path, CHATGLM3_RECORD))
    ids, labels = _chatglm3_reference(chatglm3_tokenizer, CHATGLM3_RECORD)
    assert encoded["input_ids"] == [ids] and encoded["labels"] == [labels]
    targets = chatglm3_tokenizer.decode([t for t in labels if t != IGNORE])
    for reply in ("我查一下。", "tool_call(city='北京')", "北京今天 22 度，晴。", "不客气！"):
        assert reply in targets  # every reply is trained, the tool call too
    assert "22}" not in targets and "谢谢" not in targets  # observations and user messages are not
    observation, user = chatglm3_tokenizer.convert_tokens_to_ids(["<|observation|>", "<|user|>"])
    assert observation in labels and user in labels  # the token after a reply is learned: where it stops


@needs_shared
def test_chatglm3_conversation_evaluates_its_last_reply(tmp_path, chatglm3_tokenizer):
    tokenizer = chatglm3_tokenizer
    encoded = _encode(tokenizer, "auto", _rows(tmp_path, CHATGLM3_RECORD), train=False)
    ids, _ = _chatglm3_reference(tokenizer, CHATGLM3_RECORD)
    last = tokenizer.build_single_message("assistant", "", "不客气！")
    prompt = ids[: len(ids) - 1 - len(last)] + last[:1]  # everything before the last reply, then <|assistant|>
    assert encoded["input_ids"] == [prompt] and encoded["labels"] == [last[1:]]


# ----------------------------------------------------------------------------- a chat template


@pytest.fixture(scope="module")
def chat_tokenizer(tokenizer):
    chat = copy.deepcopy(tokenizer)
    chat.chat_template = CHAT_TEMPLATE
    return chat


def test_chat_template_conversation_finds_each_reply_and_learns_its_end(tmp_path, chat_tokenizer):
    record = {"messages": [{"role": "system", "content": "S"}, *_turns("q1", "a1", "q2", "a2")]}
    encoded = _encode(chat_tokenizer, "chat_template", _rows(tmp_path, record, "messages"))

    def encode(text):
        return chat_tokenizer.encode(text, add_special_tokens=False)

    # CHAT_TEMPLATE writes "<|role|>\n{content}\n" per message and "<|assistant|>\n" as the generation prompt.
    before_1, before_2 = (
        encode("<|system|>\nS\n<|user|>\nq1\n<|assistant|>\n"),
        encode("\n<|user|>\nq2\n<|assistant|>\n"),
    )
    eos = chat_tokenizer.eos_token_id
    assert encoded["input_ids"] == [before_1 + encode("a1") + before_2 + encode("a2") + [eos]]
    assert encoded["labels"] == [
        [IGNORE] * len(before_1)
        + encode("a1")
        + [eos]  # the end of reply 1, learned where the template's "\n" follows it
        + [IGNORE] * (len(before_2) - 1)
        + encode("a2")
        + [eos]
    ]


def test_chat_template_that_rewrites_earlier_replies_is_refused(tmp_path, chat_tokenizer):
    rewriting = copy.deepcopy(chat_tokenizer)
    rewriting.chat_template = (  # hides an assistant message's content unless it is the last one
        "{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}<|assistant|>\n...\n"
        "{% else %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
    )
    rows = _rows(tmp_path, {"messages": _turns("q1", "a1", "q2", "a2")}, "messages")
    with pytest.raises(DataError) as info:
        _encode(rewriting, "chat_template", rows)
    assert str(info.value).startswith(f"{tmp_path / 'c.jsonl'}:1: the chat template")
    assert "cannot be told apart" in str(info.value)


# ----------------------------------------------------------------------------- ChatGLM2's rounds, ChatGLM-6B


def test_chatglm2_rounds_train_every_reply_with_eos_learned_after_each(tmp_path, tokenizer):
    encoded = _encode(tokenizer, "chatglm2", _rows(tmp_path, {"conversations": _turns("q1", "a1", "q2", "a2")}))

    def encode(text):
        return tokenizer.encode(text, add_special_tokens=False)

    round_1, round_2 = encode("[Round 1]\n\n问：q1\n\n答："), encode("\n\n[Round 2]\n\n问：q2\n\n答：")
    eos = tokenizer.eos_token_id
    assert encoded["input_ids"] == [round_1 + encode("a1") + round_2 + encode("a2") + [eos]]
    assert encoded["labels"] == [
        [IGNORE] * len(round_1) + encode("a1") + [eos] + [IGNORE] * (len(round_2) - 1) + encode("a2") + [eos]
    ]


@needs_shared
def test_chatglm6b_trains_each_reply_as_its_own_sample(tmp_path):
    """ChatGLM-6B reads the prompt before [gMASK] <sop> both ways: replies inside it cannot be targets."""
    from test_chatglm_prompts import tokenizer_for

    tokenizer = tokenizer_for("v1")
    conversation = _rows(tmp_path, {"conversations": _turns("你好", "你好！", "再见", "再见！")})
    encoded = _encode(tokenizer, "auto", conversation)
    one_by_one = _encode(tokenizer, "auto", [("你好", "你好！"), ("再见", "再见！", [["你好", "你好！"]])])
    assert encoded["input_ids"] == one_by_one["input_ids"] and encoded["labels"] == one_by_one["labels"]
    assert len(encoded["input_ids"]) == 2


# ----------------------------------------------------------------------------- truncation, refusals


def test_long_conversation_keeps_its_latest_turns(tmp_path, tokenizer):
    turns = _turns("第一问" * 20, "第一答" * 20, "第二问", "第二答", "第三问", "第三答")
    rows = _rows(tmp_path, {"conversations": turns})
    latest = _rows(tmp_path, {"conversations": turns[2:]})
    kept = _encode(tokenizer, "chatglm2", latest)
    limit = len(kept["input_ids"][0])
    whole = _encode(tokenizer, "chatglm2", rows)
    assert len(whole["input_ids"][0]) > limit  # so the first turn must go
    # max_source_length + max_target_length + 1 = limit: exactly the last two turns fit
    encoded = _encode(tokenizer, "chatglm2", rows, max_source_length=limit - 11, max_target_length=10)
    assert encoded["input_ids"] == kept["input_ids"] and encoded["labels"] == kept["labels"]
    assert encoded["history_dropped"] == [True] and encoded["query_cut"] == [False]


def test_conversation_whose_last_turn_alone_is_too_long_becomes_its_prompt_and_last_reply(tmp_path, tokenizer):
    rows = _rows(tmp_path, {"conversations": _turns("q1", "a1", "长问题" * 30, "a2")})
    encoded = _encode(tokenizer, "chatglm2", rows, max_source_length=16, max_target_length=8)
    single = _encode(tokenizer, "chatglm2", [("长问题" * 30, "a2")], max_source_length=16, max_target_length=8)
    assert encoded["input_ids"] == single["input_ids"] and encoded["labels"] == single["labels"]
    assert encoded["history_dropped"] == [True] and encoded["query_cut"] == [True]


@pytest.mark.parametrize(
    "template, record, needle",
    [
        ("chatglm2", CHATGLM3_RECORD, "'tools' (ChatGLM3 tool use) have no place in the chatglm2 prompt format"),
        (
            "chatglm",
            {"conversations": [*_turns("q", "a"), {"role": "observation", "content": "o"}]},
            "role 'observation' (ChatGLM3 tool use) has no place in the chatglm prompt format",
        ),
        (
            "chat_template",
            {"conversations": [_turns("q")[0], {"role": "tool", "name": "t", "parameters": {}, "observation": 1}]},
            "a tool call (role 'tool', ChatGLM3) has no place in a chat template",
        ),
        ("raw", {"conversations": _turns("q1", "a1", "q2", "a2")}, "raw has no place for earlier turns"),
        ("chatglm2", {"conversations": [*_turns("q", "a"), _turns("", "a2")[1]]}, "rounds of one user message"),
    ],
    ids=["tools-chatglm2", "observation-chatglm", "tool-chat-template", "history-raw", "two-replies-chatglm2"],
)
def test_a_conversation_the_format_cannot_write_is_one_error(tmp_path, chat_tokenizer, template, record, needle):
    rows = _rows(tmp_path, record)
    with pytest.raises(DataError) as info:
        _encode(chat_tokenizer, template, rows)
    assert str(info.value).startswith(f"{tmp_path / 'c.jsonl'}:1: ")
    assert needle in str(info.value)
