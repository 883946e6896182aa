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
"""

from collections.abc import Sequence

TEMPLATES = ("auto", "chat_template", "chatglm3", "chatglm2", "chatglm", "raw")  # --prompt_template
History = Sequence[Sequence[str]]
_SENTINEL = "\ue000"  # a private-use character no template contains; marks where the query sits


class Special(str):
    """A special token, by its name in the vocabulary: inserted as its id, never tokenized as text."""


CHATGLM3_STOP_TOKENS = ("<|user|>", "<|observation|>")  # ChatGLM3's chat() ends a reply there too


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

    def render(self, query: str, history: History | None = None) -> str:
        """The full prompt as text (special tokens by name), for display and logs."""
        return "".join(self.segments(query, history))

    def segments(self, query: str, history: History | None = None) -> list:
        """The prompt for ``query`` after the earlier ``history`` rounds, as text and :class:`Special` segments."""
        history = list(history or [])
        if self.template == "chat_template":
            return [self._chat(self.source_prefix + query, history)]
        if self.template == "chatglm3":
            return chatglm3_segments(self.source_prefix + query, history)
        return [self.source_prefix + _PLAIN_FORMATS[self.template](query, history)]

    def tail(self, history: History | None = None) -> list:
        """The segments after the query (e.g. '\\n\\n答：', or <|assistant|>): truncation keeps them so the
        model still sees the cue."""
        segments = self.segments(_SENTINEL, history)
        at = max(i for i, segment in enumerate(segments) if _SENTINEL in segment)
        rest = segments[at].rsplit(_SENTINEL, 1)[-1]
        return ([rest] if rest else []) + segments[at + 1 :]

    def answer_segments(self, answer: str) -> list:
        """The answer as the format writes it after the prompt (ChatGLM3: on a new line after <|assistant|>)."""
        return ["\n", answer] if self.template == "chatglm3" else [answer]

    def stop_tokens(self) -> tuple:
        """Tokens besides eos that end an answer."""
        return CHATGLM3_STOP_TOKENS if self.template == "chatglm3" else ()

    def generation_ids(self) -> dict:
        """``generate()``'s pad and stop ids for answers in this format (one place for training's evaluation,
        the demos and the API server)."""
        stops = [self.tokenizer.eos_token_id] + [self.tokenizer.convert_tokens_to_ids(t) for t in self.stop_tokens()]
        return {"pad_token_id": self.tokenizer.pad_token_id, "eos_token_id": stops if len(stops) > 1 else stops[0]}

    def _chat(self, query: str, history: list) -> str:
        messages = []
        for old_query, answer in history:
            messages += [{"role": "user", "content": old_query}, {"role": "assistant", "content": answer}]
        messages.append({"role": "user", "content": query})
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


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


def chatglm3_segments(query: str, history: list) -> list:
    """ChatGLM3-6B's build_chat_input: each message is its role token, "\\n" and the text, each tokenized alone."""
    segments = [Special("[gMASK]"), Special("sop")]
    for old_query, answer in history:
        segments += [Special("<|user|>"), "\n", old_query, Special("<|assistant|>"), "\n", answer]
    return segments + [Special("<|user|>"), "\n", query, Special("<|assistant|>")]


def chatglm2_prompt(query: str, history: list) -> str:
    rounds = [f"[Round {i}]\n\n问：{q}\n\n答：{a}\n\n" for i, (q, a) in enumerate(history, start=1)]
    return "".join(rounds) + f"[Round {len(history) + 1}]\n\n问：{query}\n\n答："


def chatglm_prompt(query: str, history: list) -> str:
    if not history:
        return query
    rounds = [f"[Round {i}]\n问：{q}\n答：{a}\n" for i, (q, a) in enumerate(history)]
    return "".join(rounds) + f"[Round {len(history)}]\n问：{query}\n答："


def raw_prompt(query: str, history: list) -> str:
    return query


_PLAIN_FORMATS = {"chatglm2": chatglm2_prompt, "chatglm": chatglm_prompt, "raw": raw_prompt}
