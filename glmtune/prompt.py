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
* ``raw`` - the query alone, for base models.
* ``auto`` - ``chat_template`` when the tokenizer has one, else ``chatglm2``.
"""

from typing import Optional, Sequence

History = Sequence[Sequence[str]]
_SENTINEL = "\ue000"  # a private-use character no template contains; marks where the query sits


class PromptFormat:
    def __init__(self, template: str, tokenizer=None, source_prefix: str = ""):
        self.template = resolve_template(template, tokenizer)
        self.tokenizer = tokenizer
        self.source_prefix = source_prefix

    def render(self, query: str, history: Optional[History] = None) -> str:
        """The full prompt text for ``query`` after the earlier ``history`` rounds."""
        history = list(history or [])
        if self.template == "chat_template":
            return self._chat(self.source_prefix + query, history)
        return self.source_prefix + _PLAIN_FORMATS[self.template](query, history)

    def tail(self, history: Optional[History] = None) -> str:
        """The text that follows the query (e.g. '\\n\\n答：'): truncation keeps it so the model still sees the cue."""
        return self.render(_SENTINEL, history).rsplit(_SENTINEL, 1)[-1]

    def _chat(self, query: str, history: list) -> str:
        messages = []
        for old_query, answer in history:
            messages += [{"role": "user", "content": old_query}, {"role": "assistant", "content": answer}]
        messages.append({"role": "user", "content": query})
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def resolve_template(template: str, tokenizer) -> str:
    has_chat_template = getattr(tokenizer, "chat_template", None) is not None
    if template == "auto":
        return "chat_template" if has_chat_template else "chatglm2"
    if template == "chat_template" and not has_chat_template:
        raise ValueError("--prompt_template chat_template: this tokenizer has no chat template")
    return template


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
