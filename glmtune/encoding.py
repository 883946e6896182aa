"""Prompt -> token ids and labels: prompts within max_source_length, answers, conversations trained whole.

Token layout of a prompt and its answer (any tokenizer)::

    train: input_ids = prompt + answer[:max_target_length] + [eos]
           labels    = [-100] * len(prompt) + answer[:max_target_length] + [eos]
    eval:  input_ids = prompt     labels = answer[:val_max_target_length]

The prompt is everything before the record's last reply. A prompt longer than max_source_length loses its oldest
turns first, then the start of its query (the last message); what comes before the query (the template's text,
the system text, source_prefix) and the answer cue after it are kept, so the model still sees the question's end
and knows an answer follows.

A conversation that trains every reply (conversations, messages) is one sample: the format's pieces in order,
each reply's tokens a target, and the token after each reply as well, so that the model learns where a reply
ends: ChatGLM3's next role token as written (its finetune_demo's layout), eos in the other formats (the label is
eos, the input keeps the format's text, as later prompts have it). It keeps its latest turns within
max_source_length + max_target_length + 1 tokens (what a prompt and answer can take); when its last turn alone
is longer, the sample is that turn's prompt and last reply, cut as above. ChatGLM-6B reads the context before its
trailing ``[gMASK] <sop>`` both ways, so an earlier reply there would see itself: with that tokenizer each reply
is its own sample.
"""

from dataclasses import replace

from glmtune.arguments import IGNORE_INDEX
from glmtune.errors import DataError
from glmtune.prompt import Conversation, ConversationError, PromptFormat, Special

COLUMNS = ("input_ids", "labels", "history_dropped", "query_cut", "target_truncated", "keep")


class PromptEncoder:
    """A conversation -> the prompt's token ids, as training built them (template, special tokens, truncation).

    Used for training and evaluation samples (:class:`Encoder`) and by the tools that serve a model."""

    def __init__(self, tokenizer, prompt_format: PromptFormat, max_source_length: int):
        self.tokenizer = tokenizer
        self.format = prompt_format
        self.max_source_length = max_source_length
        self.frame = special_token_frame(tokenizer) if prompt_format.framed else ([], [])

    def full_ids(self, query: str, history, system: str = "") -> list:
        """The whole prompt's ids, untruncated."""
        return self.prompt_ids(Conversation.from_history(query, history, system))

    def encode(self, query: str, history, system: str = "") -> tuple[list, bool]:
        """The prompt's ids within max_source_length, and whether it was cut (see :meth:`encode_prompt`)."""
        ids, history_dropped, query_cut = self.encode_prompt(Conversation.from_history(query, history, system))
        return ids, history_dropped or query_cut

    def prompt_ids(self, conversation: Conversation) -> list:
        before, after = self.frame
        return before + self.encode_segments(self.format.prompt(conversation)) + after

    def encode_prompt(self, conversation: Conversation) -> tuple[list, bool, bool]:
        """The prompt's ids within max_source_length, whether history turns were dropped, whether the query was cut."""
        ids, dropped = self.prompt_ids(conversation), False
        while len(ids) > self.max_source_length and conversation.turns() > 1:
            conversation, dropped = conversation.without_oldest_turn(), True
            ids = self.prompt_ids(conversation)
        if len(ids) <= self.max_source_length:
            return ids, dropped, False
        return self._cut_query(ids, conversation), dropped, True

    def _cut_query(self, ids: list, conversation: Conversation) -> list:
        """Cut the start of the query: keep the ids before it and the cue after it (a budget too small for both
        keeps the cue's end in its second half)."""
        before, after = self.frame
        head, tail = self.format.split_at_query(conversation)
        budget = self.max_source_length
        keep_tail = min(len(self.encode_segments(tail)) + len(after), budget // 2)
        keep_head = min(len(before) + len(self.encode_segments(head)), budget - keep_tail)
        return ids[:keep_head] + ids[len(ids) - (budget - keep_head) :]

    def encode_segments(self, segments: list) -> list:
        ids = []
        for segment in segments:
            if isinstance(segment, Special):
                ids.append(self.tokenizer.convert_tokens_to_ids(segment))
            elif segment:
                ids += self.tokenizer.encode(segment, add_special_tokens=False)
        return ids


class Encoder:
    """Rows of glmtune.records.FEATURES -> input_ids/labels (+ truncation flags and kept fields), for
    ``datasets.map``. Training: one sample per record, or per reply with ChatGLM-6B; evaluation: one per record."""

    def __init__(self, prompt_encoder: PromptEncoder, max_target_length: int, train: bool):
        self.prompts = prompt_encoder
        self.max_target_length = max_target_length
        self.train = train

    def __call__(self, batch: dict) -> dict:
        out = {column: [] for column in COLUMNS}
        rows = zip(batch["system"], batch["tools"], batch["messages"], batch["every_reply"], batch["where"])
        for (system, tools, messages, every_reply, where), keep in zip(rows, batch["keep"]):
            conversation = Conversation(tuple(messages), system, tools)
            try:
                samples = self._samples(conversation, every_reply)
            except ConversationError as error:
                raise DataError(f"{where}: {error}") from None
            for sample in samples:
                for column, value in {**sample, "keep": keep}.items():
                    out[column].append(value)
        return out

    def _samples(self, conversation: Conversation, every_reply: bool) -> list:
        replies = [i for i, message in enumerate(conversation.messages) if message["role"] == "assistant"]
        if not (self.train and every_reply and len(replies) > 1):
            return [self._answer_sample(conversation)]
        if self.prompts.frame[1]:  # ChatGLM-6B: see the module docstring
            return [
                self._answer_sample(replace(conversation, messages=conversation.messages[: i + 1])) for i in replies
            ]
        return [self._conversation_sample(conversation)]

    def _answer_sample(self, conversation: Conversation) -> dict:
        """The prompt before the last reply, and that reply as the answer."""
        *context, reply = conversation.messages
        prompt_ids, dropped, cut = self.prompts.encode_prompt(replace(conversation, messages=tuple(context)))
        answer_segments = self.prompts.format.answer_segments(reply["content"], reply.get("metadata", ""))
        answer_ids = self.prompts.encode_segments(answer_segments)
        flags = {
            "history_dropped": dropped,
            "query_cut": cut,
            "target_truncated": len(answer_ids) > self.max_target_length,
        }
        answer_ids = answer_ids[: self.max_target_length]
        if not self.train:
            return {"input_ids": prompt_ids, "labels": answer_ids, **flags}
        answer_ids = answer_ids + [self.prompts.tokenizer.eos_token_id]
        return {"input_ids": prompt_ids + answer_ids, "labels": [IGNORE_INDEX] * len(prompt_ids) + answer_ids, **flags}

    def _conversation_sample(self, conversation: Conversation) -> dict:
        """Every reply trained, the latest turns kept (see the module docstring)."""
        limit = self.prompts.max_source_length + self.max_target_length + 1
        ids, labels = self._every_reply(conversation)
        dropped = False
        while len(ids) > limit and conversation.turns() > 1:
            conversation, dropped = conversation.without_oldest_turn(), True
            ids, labels = self._every_reply(conversation)
        if len(ids) > limit:
            sample = self._answer_sample(conversation)
            return {**sample, "history_dropped": dropped or sample["history_dropped"]}
        return {
            "input_ids": ids,
            "labels": labels,
            "history_dropped": dropped,
            "query_cut": False,
            "target_truncated": False,
        }

    def _every_reply(self, conversation: Conversation) -> tuple[list, list]:
        eos = self.prompts.tokenizer.eos_token_id
        ids = list(self.prompts.frame[0])
        labels, after_reply = [IGNORE_INDEX] * len(ids), False
        for segments, is_reply in self.prompts.format.pieces(conversation):
            piece = self.prompts.encode_segments(segments)
            piece_labels = list(piece) if is_reply else [IGNORE_INDEX] * len(piece)
            if after_reply and piece and not is_reply:  # where the reply before ended
                piece_labels[0] = piece[0] if self.prompts.format.role_token_ends_reply else eos
            ids, labels = ids + piece, labels + piece_labels
            after_reply = is_reply or (after_reply and not piece)  # an empty piece leaves the end to the next
        return ids + [eos], labels + [eos]


def special_token_frame(tokenizer) -> tuple[list, list]:
    """The ids the tokenizer adds before and after a text (``add_special_tokens=True``): a BOS, ChatGLM2's
    ``[gMASK] sop``, ChatGLM-6B's trailing ``[gMASK] <sop>``... Read off a probe so that any tokenizer works."""
    bare = tokenizer.encode("a", add_special_tokens=False)
    full = tokenizer.encode("a", add_special_tokens=True)
    for start in range(len(full) - len(bare) + 1):
        if full[start : start + len(bare)] == bare:
            return full[:start], full[start + len(bare) :]
    raise ValueError(f"{type(tokenizer).__name__}: cannot tell which special tokens it adds around a text")
