"""Raw record -> prompt text. The only place prompt formats live.

Formats (``--prompt_template``):

* ``chat_template`` - the tokenizer's own chat template (GLM-4, Qwen, Llama instruct models):
  earlier rounds become user/assistant messages, then the query as the last user message.
* ``chatglm2`` - ChatGLM2-6B's ``build_prompt``: ``"[Round 1]\\n\\n问：{q}\\n\\n答："``, rounds counted
  from 1, used even without history (as ChatGLM2's ptuning does for ADGEN).
* ``chatglm`` - ChatGLM-6B: the raw query when there is no history, otherwise
  ``"[Round 0]\\n问：{q}\\n答：{a}\\n"`` per earlier round (counted from 0) + the current round.
  (The original trained first-round samples of chat data with a ``[Round 0]`` wrapper but evaluated
  them raw; here both use the raw query, so training and inference agree.)
* ``chatglm3`` - ChatGLM3-6B's role tokens, built token by token as its ``build_chat_input`` does:
  ``[gMASK] sop <|user|> "\n" query <|assistant|>``, earlier rounds before; the answer starts with "\n".
* ``raw`` - the query alone, for base models.
* ``auto`` - the original ChatGLM tokenizers' own format (ChatGLM-6B ``chatglm``, ChatGLM2-6B ``chatglm2``,
  ChatGLM3-6B ``chatglm3``); else ``chat_template`` when the tokenizer has one; else ``chatglm2``.

A prompt is a list of *segments*: text, tokenized on its own, and :class:`Special` tokens, inserted by id.
Text formats are one segment, framed by the tokenizer's own special tokens (e.g. ChatGLM2's leading
``[gMASK] sop``, ChatGLM-6B's trailing ``[gMASK] <sop>``); ``chatglm3`` and chat templates write their own.

Every record is a :class:`Conversation`. Its system text goes where the format has a system slot (a chat
template's system message, ChatGLM3's ``<|system|>``); the formats without one (chatglm2, chatglm, raw) put it
in front of the first user message as ``"{system}\\n\\n{message}"``, as the API server does. ChatGLM3's tool use
(tool descriptions, tool calls, observations) exists only in ``chatglm3``; the text formats need user and
assistant messages in turn, and ``raw`` a single user message.
"""

from collections.abc import Sequence
from dataclasses import dataclass, replace

TEMPLATES = ("auto", "chat_template", "chatglm3", "chatglm2", "chatglm", "raw")  # --prompt_template
History = Sequence[Sequence[str]]
_SENTINEL = "\ue000"  # a private-use character no template contains; marks where the query sits
# ChatGLM3's finetune_demo (preprocess_utils.py) writes tool descriptions and calls this way; its chat() too.
CHATGLM3_TOOLS_INTRO = "Answer the following questions as best as you can. You have access to the following tools:\n"


class Special(str):
    """A special token, by its name in the vocabulary: inserted as its id, never tokenized as text."""


class ConversationError(ValueError):
    """A conversation that the prompt format has no way to write."""


CHATGLM3_STOP_TOKENS = ("<|user|>", "<|observation|>")  # ChatGLM3's chat() ends a reply there too


@dataclass(frozen=True)
class Conversation:
    """``messages``: dicts with role (user, assistant or observation), content and optional metadata (a ChatGLM3
    tool call's tool name). ``tools``: ChatGLM3 tool descriptions as JSON text."""

    messages: tuple
    system: str = ""
    tools: str = ""

    @classmethod
    def from_history(cls, query: str, history: History | None = None, system: str = "") -> "Conversation":
        messages = []
        for old_query, answer in history or []:
            messages += [{"role": "user", "content": old_query}, {"role": "assistant", "content": answer}]
        return cls((*messages, {"role": "user", "content": query}), system)

    def turns(self) -> int:
        """How many turns: a turn is a user message and what follows it up to the next one."""
        return sum(message["role"] == "user" for message in self.messages)

    def without_oldest_turn(self) -> "Conversation":
        users = [i for i, message in enumerate(self.messages) if message["role"] == "user"]
        return replace(self, messages=self.messages[users[1] :])

    def with_last_content(self, content: str) -> "Conversation":
        return replace(self, messages=(*self.messages[:-1], {**self.messages[-1], "content": content}))


class PromptFormat:
    def __init__(self, template: str, tokenizer=None, source_prefix: str = ""):
        self.template = resolve_template(template, tokenizer)
        self.tokenizer = tokenizer
        self.source_prefix = source_prefix

    @property
    def framed(self) -> bool:
        """Whether the tokenizer adds its special tokens around the prompt (text formats) or not (the
        formats that write their own)."""
        return self.template not in ("chat_template", "chatglm3")

    @property
    def role_token_ends_reply(self) -> bool:
        """ChatGLM3 learns the token after each reply as it is: the next role token (<|user|>, <|observation|>, or
        <|assistant|> when a tool call follows a thought), eos at the end (its finetune_demo, ANCESTORS §5). The
        other formats stop at eos only, so an earlier reply's end is learned as eos (see glmtune.encoding)."""
        return self.template == "chatglm3"

    def render(self, query: str, history: History | None = None, system: str = "") -> str:
        """The full prompt as text (special tokens by name), for display and logs."""
        return "".join(self.segments(query, history, system))

    def segments(self, query: str, history: History | None = None, system: str = "") -> list:
        """The prompt for ``query`` after the earlier ``history`` rounds, as text and :class:`Special` segments."""
        return self.prompt(Conversation.from_history(query, history, system))

    def tail(self, history: History | None = None) -> list:
        """The segments after the query (e.g. '\\n\\n答：', or <|assistant|>): truncation keeps them so the
        model still sees the cue."""
        return self.split_at_query(Conversation.from_history("", history))[1]

    def prompt(self, conversation: Conversation) -> list:
        """The prompt for the reply to ``conversation``, whose last message is what the reply answers."""
        self._check(conversation)
        if self.template == "chat_template":
            return [self._apply_chat_template(self._chat_messages(conversation), add_generation_prompt=True)]
        if self.template == "chatglm3":
            segments = [segment for piece, _ in self._chatglm3_pieces(conversation) for segment in piece]
            return segments + [Special("<|assistant|>")]
        rounds = _rounds(_fold_system(conversation), with_last_reply=False)
        query, _ = rounds[-1]
        return [self.source_prefix + _PLAIN_FORMATS[self.template](query, rounds[:-1])]

    def pieces(self, conversation: Conversation) -> list:
        """A conversation that ends with a reply, as (segments, is_reply) pieces in order; every assistant message
        is a reply. Joined, the pieces before a reply are the prompt :meth:`prompt` writes for it (chatglm's first
        reply excepted: a round is written raw only when it is alone)."""
        self._check(conversation)
        if self.template == "chat_template":
            return self._chat_pieces(self._chat_messages(conversation))
        if self.template == "chatglm3":
            return self._chatglm3_pieces(conversation)
        return self._plain_pieces(conversation, _rounds(_fold_system(conversation), with_last_reply=True))

    def split_at_query(self, conversation: Conversation) -> tuple[list, list]:
        """The prompt's segments before and after the content of the last message (the query)."""
        segments = self.prompt(conversation.with_last_content(_SENTINEL))
        for at, segment in enumerate(segments):
            if _SENTINEL in segment:
                before, after = segment.split(_SENTINEL, 1)
                return segments[:at] + ([before] if before else []), ([after] if after else []) + segments[at + 1 :]
        return [], []

    def answer_segments(self, answer: str, metadata: str = "") -> list:
        """The answer as the format writes it after the prompt (ChatGLM3: on a new line after <|assistant|> and
        the tool name of a tool call)."""
        return [f"{metadata}\n", answer] if self.template == "chatglm3" else [answer]

    def stop_tokens(self) -> tuple:
        """Tokens besides eos that end an answer."""
        return CHATGLM3_STOP_TOKENS if self.template == "chatglm3" else ()

    def generation_ids(self) -> dict:
        """``generate()``'s pad and stop ids for answers in this format (one place for training's evaluation,
        the demos and the API server)."""
        stops = [self.tokenizer.eos_token_id] + [self.tokenizer.convert_tokens_to_ids(t) for t in self.stop_tokens()]
        return {"pad_token_id": self.tokenizer.pad_token_id, "eos_token_id": stops if len(stops) > 1 else stops[0]}

    # ------------------------------------------------------------------ per format

    def _check(self, conversation: Conversation) -> None:
        if self.template == "chatglm3":
            return
        where = f"the {self.template} prompt format" if self.template != "chat_template" else "a chat template"
        fix = "use --prompt_template chatglm3 with a ChatGLM3 tokenizer"
        if conversation.tools:
            raise ConversationError(f"'tools' (ChatGLM3 tool use) have no place in {where}: {fix}")
        for message in conversation.messages:
            if message.get("metadata"):
                raise ConversationError(f"a tool call (role 'tool', ChatGLM3) has no place in {where}: {fix}")
            if message["role"] == "observation":
                raise ConversationError(f"role 'observation' (ChatGLM3 tool use) has no place in {where}: {fix}")
        if self.template == "raw" and conversation.turns() > 1:
            raise ConversationError("--prompt_template raw has no place for earlier turns: pick another template")

    def _with_prefix(self, messages: tuple) -> list:
        """source_prefix in front of the last user message (chat templates, chatglm3)."""
        messages = [dict(message) for message in messages]
        if self.source_prefix:
            last = max(i for i, message in enumerate(messages) if message["role"] == "user")
            messages[last]["content"] = self.source_prefix + messages[last]["content"]
        return messages

    def _chatglm3_pieces(self, conversation: Conversation) -> list:
        """ChatGLM3's build_single_message per message: role token, "\\n" (after a tool call's name), content."""
        context = [Special("[gMASK]"), Special("sop")]
        if conversation.tools:
            context += [Special("<|system|>"), "\n", CHATGLM3_TOOLS_INTRO + conversation.tools]
        if conversation.system:
            context += [Special("<|system|>"), "\n", conversation.system]
        pieces = []
        for message in self._with_prefix(conversation.messages):
            if message["role"] == "assistant":
                pieces += [(context + [Special("<|assistant|>")], False)]
                pieces += [(self.answer_segments(message["content"], message.get("metadata", "")), True)]
                context = []
            else:
                context += [Special(f"<|{message['role']}|>"), "\n", message["content"]]
        return pieces + ([(context, False)] if context else [])

    def _plain_pieces(self, conversation: Conversation, rounds: list) -> list:
        if len(rounds) == 1:
            prompt = self.prompt(replace(conversation, messages=conversation.messages[:-1]))
            return [(prompt, False), ([rounds[0][1]], True)]
        template, separator, first = _ROUNDS[self.template]
        pieces = []
        for index, (query, reply) in enumerate(rounds):
            glue = self.source_prefix if index == 0 else separator
            pieces += [([glue + template.format(index=first + index, query=query)], False), ([reply], True)]
        return pieces

    def _chat_messages(self, conversation: Conversation) -> list:
        system = [{"role": "system", "content": conversation.system}] if conversation.system else []
        return system + [{"role": m["role"], "content": m["content"]} for m in self._with_prefix(conversation.messages)]

    def _chat_pieces(self, messages: list) -> list:
        """Each reply's place, found by rendering the conversation up to it: the generation prompt after the
        messages before a reply must continue what was rendered so far, and the reply must follow it."""
        pieces, done = [], ""
        for index, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prompt = self._apply_chat_template(messages[:index], add_generation_prompt=True)
            if not prompt.startswith(done):
                raise ConversationError(
                    f"the chat template renders the messages before reply {index} differently from the whole "
                    "conversation, so its replies cannot be told apart; train on one reply per record (prompt_response)"
                )
            pieces += [([prompt[len(done) :]], False), ([message["content"]], True)]
            done = prompt + message["content"]
        if not self._apply_chat_template(messages, add_generation_prompt=False).startswith(done):
            raise ConversationError(
                "the chat template does not write each reply right after its generation prompt, so its replies "
                "cannot be told apart; train on one reply per record (prompt_response)"
            )
        return pieces

    def _apply_chat_template(self, messages: list, add_generation_prompt: bool) -> str:
        from jinja2 import TemplateError

        try:
            return self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt
            )
        except TemplateError as error:
            raise ConversationError(f"the chat template refused the messages: {error}") from None


def _fold_system(conversation: Conversation) -> tuple:
    """Messages with the system text in front of the first user message (formats without a system slot)."""
    messages = conversation.messages
    if not conversation.system:
        return messages
    first = next(i for i, message in enumerate(messages) if message["role"] == "user")
    folded = {**messages[first], "content": f"{conversation.system}\n\n{messages[first]['content']}"}
    return (*messages[:first], folded, *messages[first + 1 :])


def _rounds(messages: tuple, with_last_reply: bool) -> list:
    """[(query, reply)] from user and assistant messages in turn; the last reply is None without one."""
    roles = [message["role"] for message in messages]
    expected = ["user", "assistant"] * (len(messages) // 2) + ["user"] * (len(messages) % 2)
    if roles != expected or with_last_reply != (len(messages) % 2 == 0):
        raise ConversationError(
            "this prompt format writes rounds of one user message and one reply: got roles " + ", ".join(roles)
        )
    contents = [message["content"] for message in messages] + ([] if with_last_reply else [None])
    return list(zip(contents[::2], contents[1::2]))


# The original ChatGLM tokenizers (glmtune.chatglm.tokenization), by class name: their models' own formats.
ORIGINAL_FORMATS = {"ChatGLMTokenizer": "chatglm", "ChatGLM2Tokenizer": "chatglm2", "ChatGLM3Tokenizer": "chatglm3"}


def resolve_template(template: str, tokenizer) -> str:
    has_chat_template = getattr(tokenizer, "chat_template", None) is not None
    if template == "auto":
        original = ORIGINAL_FORMATS.get(type(tokenizer).__name__)
        return original or ("chat_template" if has_chat_template else "chatglm2")
    if template == "chat_template" and not has_chat_template:
        raise ValueError("--prompt_template chat_template: this tokenizer has no chat template")
    if template == "chatglm3" and tokenizer is not None and not _has_tokens(tokenizer, ("<|user|>", "<|assistant|>")):
        raise ValueError("--prompt_template chatglm3: this tokenizer has no <|user|> / <|assistant|> tokens")
    return template


def _has_tokens(tokenizer, tokens) -> bool:
    vocab = tokenizer.get_vocab()
    return all(token in vocab for token in tokens)


def chatglm3_tool_call(parameters: dict) -> str:
    """A ChatGLM3 tool call's text, as its finetune_demo writes it: a Python call of ``tool_call`` in a code block."""
    arguments = ", ".join(f"{name}={value!r}" for name, value in parameters.items())
    return f"```python\ntool_call({arguments})\n```"


# Text formats: (round, separator after a reply, number of the first round)
_ROUNDS = {
    "chatglm2": ("[Round {index}]\n\n问：{query}\n\n答：", "\n\n", 1),
    "chatglm": ("[Round {index}]\n问：{query}\n答：", "\n", 0),
}


def _round_prompt(template: str, query: str, history: list) -> str:
    round_text, separator, first = _ROUNDS[template]
    rounds = [round_text.format(index=first + i, query=q) + a + separator for i, (q, a) in enumerate(history)]
    return "".join(rounds) + round_text.format(index=first + len(history), query=query)


def chatglm2_prompt(query: str, history: list) -> str:
    return _round_prompt("chatglm2", query, history)


def chatglm_prompt(query: str, history: list) -> str:
    return _round_prompt("chatglm", query, history) if history else query


def raw_prompt(query: str, history: list) -> str:
    return query


_PLAIN_FORMATS = {"chatglm2": chatglm2_prompt, "chatglm": chatglm_prompt, "raw": raw_prompt}
