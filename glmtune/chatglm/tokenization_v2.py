"""ChatGLM2-6B's and ChatGLM3-6B's tokenizers (one SentencePiece file; v3 adds the role tokens).

* v2 (``tokenizer.model``, 64789 pieces + ``[MASK] [gMASK] [sMASK] sop eop`` at 64789-64793): ``[gMASK] sop``
  are *prepended*; eos ``</s>`` 2, pad ``<unk>`` 0, no bos, and ``unk_token_id`` None (the original never set
  it). Specials, eos, bos and pad decode to ''. Every encoding carries ``attention_mask`` and ``position_ids``.
* v3 (the same model file): v2 plus ``<|system|> <|user|> <|assistant|> <|observation|>`` (64794-64797);
  specials decode to their names. Role-token text in plain input is split like any text unless
  ``encode_special_tokens=True``; ``v3_variant="2024-06"`` selects the 2024 copy of the code, where that
  option also matches ``[MASK] [gMASK] [sMASK] sop eop`` (even inside words) and ``unk_token_id`` is 0.
"""

import json
import re

from glmtune.chatglm.tokenization_base import V3_VARIANTS, _ChatGLMTokenizerBase
from glmtune.errors import GlmtuneError


class ChatGLM2Tokenizer(_ChatGLMTokenizerBase):
    """ChatGLM2-6B's tokenizer (THUDM/chatglm2-6b, 2023-09)."""

    version = "v2"
    SPECIAL_TOKENS = ("[MASK]", "[gMASK]", "[sMASK]", "sop", "eop")

    def __init__(self, vocab_file, clean_up_tokenization_spaces=False, **kwargs):
        for name, token in (("eos_token", "</s>"), ("pad_token", "<unk>"), ("unk_token", "<unk>")):
            kwargs.setdefault(name, token)
        super().__init__(vocab_file, clean_up_tokenization_spaces=clean_up_tokenization_spaces, **kwargs)

    def _after_load(self):
        """The special tokens take the ids after the SentencePiece pieces, in order."""
        self.special_token_ids = {token: self._pieces + i for i, token in enumerate(self._special_tokens())}
        self._special_names = {i: token for token, i in self.special_token_ids.items()}
        self._commands = {
            "<bos>": self.sp.bos_id(),
            "<eos>": self.sp.eos_id(),
            "<pad>": self.sp.unk_id(),
            **self.special_token_ids,
        }
        self._blank_ids = {self.sp.eos_id(), self.sp.bos_id(), self.sp.unk_id(), *self._special_names}

    def _special_tokens(self) -> tuple:
        return self.SPECIAL_TOKENS

    @property
    def unk_token_id(self):
        """None, as in the original: it named ``<unk>`` as its unk token but never registered it."""
        return None

    @property
    def vocab_size(self) -> int:
        return self._pieces + len(self.special_token_ids)

    def get_command(self, token: str) -> int:
        """The id of ``<bos>``, ``<eos>``, ``<pad>`` (= unk, 0) or a special token, as the original's."""
        if token not in self._commands:
            raise KeyError(f"{token} is not a special token for GLMTokenizer")
        return self._commands[token]

    def _tokenize(self, text, **kwargs):
        return self.sp.EncodeAsPieces(text)

    def _convert_token_to_id(self, token):
        return self.special_token_ids[token] if token in self.special_token_ids else self.sp.PieceToId(token)

    def _convert_id_to_token(self, index):
        return "" if index in self._blank_ids or not 0 <= index < self._pieces else self.sp.IdToPiece(index)

    def convert_tokens_to_string(self, tokens) -> str:
        return self.sp.DecodePieces(list(tokens))

    def build_inputs_with_special_tokens(self, token_ids_0, token_ids_1=None):
        """``[gMASK] sop a``; a pair: ``[gMASK] sop a b </s>``."""
        ids = [self.get_command("[gMASK]"), self.get_command("sop")] + list(token_ids_0)
        return ids if token_ids_1 is None else ids + list(token_ids_1) + [self.get_command("<eos>")]

    def build_prompt(self, query: str, history=None) -> str:
        """ChatGLM2-6B's chat prompt: ``[Round n]\\n\\n问：{q}\\n\\n答：{a}\\n\\n`` per earlier round, rounds from 1."""
        prompt = "".join(f"[Round {i}]\n\n问：{q}\n\n答：{a}\n\n" for i, (q, a) in enumerate(history or [], start=1))
        return prompt + f"[Round {len(history or []) + 1}]\n\n问：{query}\n\n答："

    def _add_masks(self, encoded: dict, max_length):
        """A 1/0 mask and positions 0..L-1 on every encoding, padded or not."""
        length = len(encoded[self.model_input_names[0]])
        encoded.setdefault("attention_mask", [1] * length)
        encoded.setdefault("position_ids", list(range(length)))

    def _pad_left(self, encoded: dict, missing: int):
        encoded["attention_mask"] = [0] * missing + list(encoded["attention_mask"])
        encoded["position_ids"] = [0] * missing + list(encoded["position_ids"])
        super()._pad_left(encoded, missing)


class ChatGLM3Tokenizer(ChatGLM2Tokenizer):
    """ChatGLM3-6B's tokenizer (THUDM/chatglm3-6b, 2023-12; ``v3_variant="2024-06"`` for the 2024 copy)."""

    version = "v3"
    ROLES = ("system", "user", "assistant", "observation")
    ROLE_TOKENS = tuple(f"<|{role}|>" for role in ROLES)

    def __init__(self, vocab_file, encode_special_tokens=False, v3_variant="2023-12", **kwargs):
        if v3_variant not in V3_VARIANTS:
            raise GlmtuneError(f"v3_variant={v3_variant!r}: expected one of {', '.join(V3_VARIANTS)}")
        self.encode_special_tokens, self.v3_variant = encode_special_tokens, v3_variant
        super().__init__(vocab_file, **kwargs)

    def _special_tokens(self) -> tuple:
        return self.SPECIAL_TOKENS + self.ROLE_TOKENS

    @property
    def unk_token_id(self):
        """None in the 2023 code (as v2); the 2024 copy answers 0."""
        return self.sp.unk_id() if self.v3_variant == "2024-06" else None

    def get_command(self, token: str) -> int:
        if token == "<unk>" and self.v3_variant == "2024-06":
            return self.sp.unk_id()
        return super().get_command(token)

    def _convert_id_to_token(self, index):
        return self._special_names.get(index) or super()._convert_id_to_token(index)

    def _tokenize(self, text, **kwargs):
        """With ``encode_special_tokens`` the role tokens (2024 copy: every special token) written in the
        text become their ids; the text between them is encoded on its own."""
        if not self.encode_special_tokens:
            return self.sp.EncodeAsPieces(text)
        names = self.ROLE_TOKENS if self.v3_variant == "2023-12" else self._special_tokens()
        parts = re.split("(" + "|".join(re.escape(name) for name in names) + ")", text)
        return [
            piece
            for i, part in enumerate(parts)
            if part
            for piece in ([part] if i % 2 else self.sp.EncodeAsPieces(part))
        ]

    def build_single_message(self, role: str, metadata: str, message: str) -> list:
        """``<|role|>`` + ``metadata\\n`` + message, each text encoded alone by SentencePiece."""
        if role not in self.ROLES:
            raise GlmtuneError(f"ChatGLM3 role {role!r}: expected one of {', '.join(self.ROLES)}")
        return [self.get_command(f"<|{role}|>")] + self.sp.encode(f"{metadata}\n") + self.sp.encode(message)

    def build_chat_input(self, query: str, history=None, role: str = "user", return_tensors="pt"):
        """What ChatGLM3-6B's ``chat()`` feeds to generate: ``[gMASK] sop``, the history's messages (dicts with
        role, content and optional metadata; a system message's ``tools`` as indented JSON), the query under
        ``role``, then ``<|assistant|>``; with attention_mask and position_ids."""
        ids = []
        for item in history or []:
            content = item["content"]
            if item["role"] == "system" and "tools" in item:
                content = content + "\n" + json.dumps(item["tools"], indent=4, ensure_ascii=False)
            ids += self.build_single_message(item["role"], item.get("metadata", ""), content)
        ids += self.build_single_message(role, "", query) + [self.get_command("<|assistant|>")]
        return self([ids], is_split_into_words=True, return_tensors=return_tensors)

    def _config(self) -> dict:
        return {**super()._config(), "encode_special_tokens": self.encode_special_tokens, "v3_variant": self.v3_variant}
