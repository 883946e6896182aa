"""Tests for glmtune.prompt: the exact prompt strings of every --prompt_template, and the answer cue."""

import copy

import pytest

from glmtune.prompt import Conversation, PromptFormat, Special, resolve_template

# A small chat template in the GLM-4 style, written with the tiny tokenizer's special tokens.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

HISTORY_1 = [["q1", "a1"]]
HISTORY_2 = [["q1", "a1"], ["q2", "a2"]]


@pytest.fixture(scope="module")
def chat_tokenizer(tokenizer):
    chat = copy.deepcopy(tokenizer)
    chat.chat_template = CHAT_TEMPLATE
    return chat


def _messages(query, history):
    messages = []
    for old_query, answer in history:
        messages += [{"role": "user", "content": old_query}, {"role": "assistant", "content": answer}]
    return messages + [{"role": "user", "content": query}]


# ----------------------------------------------------------------------------- chatglm2


def test_chatglm2_without_history_is_wrapped_as_round_1():
    prompt = PromptFormat("chatglm2").render("类型#裤*颜色#红")
    assert prompt == "[Round 1]\n\n问：类型#裤*颜色#红\n\n答："
    assert "\uff1a" in prompt and ":" not in prompt  # full-width colon U+FF1A, never ASCII


def test_chatglm2_one_round_of_history():
    assert PromptFormat("chatglm2").render("q", HISTORY_1) == (
        "[Round 1]\n\n问：q1\n\n答：a1\n\n[Round 2]\n\n问：q\n\n答："
    )


def test_chatglm2_two_rounds_of_history():
    assert PromptFormat("chatglm2").render("q", HISTORY_2) == (
        "[Round 1]\n\n问：q1\n\n答：a1\n\n[Round 2]\n\n问：q2\n\n答：a2\n\n[Round 3]\n\n问：q\n\n答："
    )


def test_chatglm2_empty_history_same_as_none():
    fmt = PromptFormat("chatglm2")
    assert fmt.render("q", []) == fmt.render("q", None) == "[Round 1]\n\n问：q\n\n答："


# ----------------------------------------------------------------------------- chatglm (ChatGLM-6B)


def test_chatglm_without_history_is_the_raw_query():
    assert PromptFormat("chatglm").render("类型#裤") == "类型#裤"
    assert PromptFormat("chatglm").render("类型#裤", []) == "类型#裤"


def test_chatglm_with_history_counts_rounds_from_0():
    assert PromptFormat("chatglm").render("q", HISTORY_1) == "[Round 0]\n问：q1\n答：a1\n[Round 1]\n问：q\n答："
    assert PromptFormat("chatglm").render("q", HISTORY_2) == (
        "[Round 0]\n问：q1\n答：a1\n[Round 1]\n问：q2\n答：a2\n[Round 2]\n问：q\n答："
    )


# ----------------------------------------------------------------------------- raw, source_prefix


def test_raw_is_the_query_alone():
    assert PromptFormat("raw").render("hello") == "hello"
    assert PromptFormat("raw", source_prefix="P: ").render("hello") == "P: hello"


def test_source_prefix_precedes_the_whole_plain_prompt():
    assert PromptFormat("chatglm2", source_prefix="摘要：").render("q", HISTORY_1) == (
        "摘要：[Round 1]\n\n问：q1\n\n答：a1\n\n[Round 2]\n\n问：q\n\n答："
    )
    assert PromptFormat("chatglm", source_prefix="PFX ").render("q") == "PFX q"
    assert PromptFormat("chatglm", source_prefix="PFX ").render("q", HISTORY_1) == (
        "PFX [Round 0]\n问：q1\n答：a1\n[Round 1]\n问：q\n答："
    )


def test_source_prefix_goes_into_the_last_user_message_of_a_chat_template(chat_tokenizer):
    prompt = PromptFormat("chat_template", chat_tokenizer, source_prefix="PFX ").render("q", HISTORY_1)
    expected = chat_tokenizer.apply_chat_template(
        _messages("PFX q", HISTORY_1), tokenize=False, add_generation_prompt=True
    )
    assert prompt == expected
    assert prompt == "<|user|>\nq1\n<|assistant|>\na1\n<|user|>\nPFX q\n<|assistant|>\n"


# ----------------------------------------------------------------------------- auto / chat_template


def test_auto_without_chat_template_is_chatglm2(tokenizer):
    assert tokenizer.chat_template is None
    fmt = PromptFormat("auto", tokenizer)
    assert fmt.template == "chatglm2"
    assert fmt.render("q") == "[Round 1]\n\n问：q\n\n答："
    assert resolve_template("auto", None) == "chatglm2"


def test_auto_with_chat_template_uses_it(chat_tokenizer):
    fmt = PromptFormat("auto", chat_tokenizer)
    assert fmt.template == "chat_template"
    assert fmt.render("q") == "<|user|>\nq\n<|assistant|>\n"


def test_explicit_plain_template_wins_over_a_chat_template(chat_tokenizer):
    assert PromptFormat("chatglm2", chat_tokenizer).render("q") == "[Round 1]\n\n问：q\n\n答："


@pytest.mark.parametrize("history", [[], HISTORY_1, HISTORY_2], ids=["0-rounds", "1-round", "2-rounds"])
def test_chat_template_matches_apply_chat_template(chat_tokenizer, history):
    prompt = PromptFormat("chat_template", chat_tokenizer).render("类型#裤", history)
    expected = chat_tokenizer.apply_chat_template(
        _messages("类型#裤", history), tokenize=False, add_generation_prompt=True
    )
    assert prompt == expected
    assert prompt.count("<|user|>") == len(history) + 1
    assert prompt.count("<|assistant|>") == len(history) + 1
    assert prompt.endswith("<|user|>\n类型#裤\n<|assistant|>\n")


def test_chat_template_on_a_tokenizer_without_one_raises(tokenizer):
    with pytest.raises(ValueError, match="chat template"):
        PromptFormat("chat_template", tokenizer)
    with pytest.raises(ValueError, match="chat template"):
        PromptFormat("chat_template", None)


# ----------------------------------------------------------------------------- tail (the answer cue)


@pytest.mark.parametrize("history", [None, HISTORY_1, HISTORY_2])
def test_chatglm2_tail_is_the_answer_cue(history):
    fmt = PromptFormat("chatglm2", source_prefix="PFX")
    assert fmt.tail(history) == ["\n\n答："]
    assert fmt.render("q", history).endswith("q" + "".join(fmt.tail(history)))


def test_chatglm_tail():
    assert PromptFormat("chatglm").tail() == []  # raw query: nothing follows it
    assert PromptFormat("chatglm").tail(HISTORY_1) == ["\n答："]
    assert PromptFormat("raw").tail() == []


def test_chat_template_tail_is_the_text_after_the_query(chat_tokenizer):
    fmt = PromptFormat("chat_template", chat_tokenizer)
    without_cue = chat_tokenizer.apply_chat_template(_messages("q", []), tokenize=False, add_generation_prompt=False)
    with_cue = chat_tokenizer.apply_chat_template(_messages("q", []), tokenize=False, add_generation_prompt=True)
    generation_prompt = with_cue[len(without_cue) :]
    assert generation_prompt == "<|assistant|>\n"
    for history in (None, HISTORY_2):
        tail = "".join(fmt.tail(history))
        assert tail == "\n<|assistant|>\n"  # end of the user turn + the generation prompt
        assert tail.endswith(generation_prompt)
        assert fmt.render("q", history).endswith("q" + tail)


# ----------------------------------------------------------------------------- chatglm3 (role tokens)


def test_chatglm3_segments_are_role_tokens_and_separately_tokenized_texts():
    fmt = PromptFormat("chatglm3", source_prefix="PFX")
    segments = fmt.segments("q", HISTORY_1)
    assert segments == [
        "[gMASK]",
        "sop",
        "<|user|>",
        "\n",
        "q1",
        "<|assistant|>",
        "\n",
        "a1",
        "<|user|>",
        "\n",
        "PFXq",
        "<|assistant|>",
    ]
    assert [isinstance(s, Special) for s in segments] == [
        True,
        True,
        True,
        False,
        False,
        True,
        False,
        False,
        True,
        False,
        False,
        True,
    ]
    assert fmt.tail(HISTORY_1) == ["<|assistant|>"] and isinstance(fmt.tail()[0], Special)
    assert fmt.answer_segments("a") == ["\n", "a"]
    assert fmt.stop_tokens() == ("<|user|>", "<|observation|>")
    assert not fmt.framed and PromptFormat("chatglm2").framed


# ----------------------------------------------------------------------------- system text, conversations


def test_system_text_goes_in_front_of_the_first_user_message_without_a_system_slot():
    assert PromptFormat("chatglm2").render("q", HISTORY_1, system="S") == (
        "[Round 1]\n\n问：S\n\nq1\n\n答：a1\n\n[Round 2]\n\n问：q\n\n答："
    )
    assert PromptFormat("chatglm").render("q", system="S") == "S\n\nq"
    assert PromptFormat("raw", source_prefix="P ").render("q", system="S") == "P S\n\nq"


def test_system_text_goes_into_the_system_slot(chat_tokenizer):
    segments = PromptFormat("chatglm3").segments("q", system="S")
    assert segments == ["[gMASK]", "sop", "<|system|>", "\n", "S", "<|user|>", "\n", "q", "<|assistant|>"]
    assert isinstance(segments[2], Special)
    expected = chat_tokenizer.apply_chat_template(
        [{"role": "system", "content": "S"}, *_messages("q", HISTORY_1)], tokenize=False, add_generation_prompt=True
    )
    assert PromptFormat("chat_template", chat_tokenizer).render("q", HISTORY_1, system="S") == expected
    assert expected.startswith("<|system|>\nS\n<|user|>\nq1\n")


@pytest.mark.parametrize("template", ["chatglm2", "chatglm", "chatglm3", "chat_template"])
def test_pieces_before_a_reply_join_to_its_prompt(chat_tokenizer, template):
    fmt = PromptFormat(template, chat_tokenizer)  # (source_prefix goes to the last query only)
    messages = [{"role": m["role"], "content": m["content"]} for m in _messages("q2", HISTORY_1)]
    conversation = Conversation((*messages, {"role": "assistant", "content": "a2"}), "S")
    pieces = fmt.pieces(conversation)
    assert [is_reply for _, is_reply in pieces] == [False, True, False, True]
    assert [segments for segments, is_reply in pieces if is_reply] == [
        fmt.answer_segments("a1"),
        fmt.answer_segments("a2"),
    ]
    joined = ["".join(segment for segments, _ in pieces[:end] for segment in segments) for end in (1, 3)]
    assert joined[1] == "".join(fmt.prompt(Conversation(tuple(messages), "S")))
    if template != "chatglm":  # ChatGLM-6B writes a lone first round raw
        assert joined[0] == "".join(fmt.prompt(Conversation(tuple(messages[:1]), "S")))


def test_split_at_query_is_what_surrounds_the_last_message():
    fmt = PromptFormat("chatglm2", source_prefix="PFX")
    head, tail = fmt.split_at_query(Conversation.from_history("q", HISTORY_1, "S"))
    assert head == ["PFX[Round 1]\n\n问：S\n\nq1\n\n答：a1\n\n[Round 2]\n\n问："] and tail == ["\n\n答："]
    head, tail = PromptFormat("chatglm3").split_at_query(Conversation.from_history("q", [], "S"))
    assert head == ["[gMASK]", "sop", "<|system|>", "\n", "S", "<|user|>", "\n"] and tail == ["<|assistant|>"]
