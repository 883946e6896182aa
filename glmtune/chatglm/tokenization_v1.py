"""ChatGLM-6B's tokenizer.

``ice_text.model`` (130344 pieces): ``\\n`` becomes ``<n>``, ``\\t`` ``<|tab|>`` and runs of 2-80 spaces
``<|blank_n|>`` before SentencePiece, and back when decoding; its normaliser is lossy (NFKC, ``\\r`` and a
zero-width space become spaces, outer spaces vanish). Text ids are SentencePiece ids shifted by
``num_image_tokens`` (0 in the final release, whose model file holds the specials ``[MASK]`` 130000 ...
``<eop>`` 130005 itself). ``[gMASK] <sop>`` are *appended*. Its five named special tokens (``<sop>``,
``<eop>``, ``<unk>``, ``<pad>``, ``[MASK]``) are never split when they occur in text, and transformers 4.33
stripped the whitespace on both sides of them; pad ids are dropped before decoding; decoding cleans up
tokenization spaces (4.33's default). Padding builds a boolean [1, L, L] mask (True = masked,
bidirectional up to ``<sop>``) and 2-D positions [2, L], only when padding is requested.
"""

import numpy as np

from glmtune.chatglm.tokenization_base import _ChatGLMTokenizerBase


class ChatGLMTokenizer(_ChatGLMTokenizerBase):
    """ChatGLM-6B's tokenizer (the final 2023-05 revision of THUDM/chatglm-6b)."""

    version = "v1"
    vocab_files_names = {"vocab_file": "ice_text.model"}
    _legacy_protected = ("<sop>", "<eop>", "<unk>", "<pad>", "[MASK]")  # bos, eos, unk, pad, mask
    MAX_BLANK = 80  # the longest space run with its own <|blank_n|> piece

    def __init__(
        self,
        vocab_file,
        do_lower_case=False,
        remove_space=False,
        bos_token="<sop>",
        eos_token="<eop>",
        end_token="</s>",
        mask_token="[MASK]",
        gmask_token="[gMASK]",
        pad_token="<pad>",
        unk_token="<unk>",
        num_image_tokens=0,
        clean_up_tokenization_spaces=True,
        **kwargs,
    ):
        self.do_lower_case, self.remove_space, self.num_image_tokens = do_lower_case, remove_space, num_image_tokens
        self.gmask_token, self.end_token = gmask_token, end_token
        self._legacy_protected = tuple(t for t in (bos_token, eos_token, unk_token, pad_token, mask_token) if t)
        super().__init__(
            vocab_file,
            bos_token=bos_token,
            eos_token=eos_token,
            mask_token=mask_token,
            pad_token=pad_token,
            unk_token=unk_token,
            clean_up_tokenization_spaces=clean_up_tokenization_spaces,
            **kwargs,
        )

    @property
    def vocab_size(self) -> int:
        return self.num_image_tokens + self._pieces

    @property
    def gmask_token_id(self):
        return self.convert_tokens_to_ids(self.gmask_token)

    @property
    def end_token_id(self):
        return self.convert_tokens_to_ids(self.end_token)

    def _preprocess(self, text: str) -> str:
        if self.remove_space:
            text = " ".join(text.strip().split())
        if self.do_lower_case:
            text = text.lower()
        text = text.replace("\n", "<n>").replace("\t", "<|tab|>")
        for length in range(self.MAX_BLANK, 1, -1):  # longest runs first
            text = text.replace(" " * length, f"<|blank_{length}|>")
        return text

    def _tokenize(self, text, **kwargs):
        return self.sp.EncodeAsPieces(self._preprocess(text))

    def _convert_token_to_id(self, token):
        if token.startswith("<image_") and token.endswith(">") and token[7:-1].isdigit():
            return int(token[7:-1])
        return self.sp.PieceToId(token) + self.num_image_tokens

    def _convert_id_to_token(self, index):
        if index < self.num_image_tokens:
            return f"<image_{index}>"
        index -= self.num_image_tokens
        return self.sp.IdToPiece(index) if 0 <= index < self._pieces else ""

    def convert_tokens_to_string(self, tokens) -> str:
        text = self.sp.DecodePieces(list(tokens)).replace("<n>", "\n").replace("<|tab|>", "\t")
        for length in range(2, self.MAX_BLANK + 1):
            text = text.replace(f"<|blank_{length}|>", " " * length)
        return text

    def _decode(self, token_ids, **kwargs) -> str:
        ids, pad = ([token_ids] if isinstance(token_ids, int) else [int(i) for i in token_ids]), self.pad_token_id
        return super()._decode([i for i in ids if i != pad], **kwargs) if ids else ""

    def build_inputs_with_special_tokens(self, token_ids_0, token_ids_1=None):
        """``a [gMASK] <sop>``; a pair: ``a [gMASK] <sop> b <eop>``."""
        ids = list(token_ids_0) + [self.gmask_token_id, self.bos_token_id]
        return ids if token_ids_1 is None else ids + list(token_ids_1) + [self.eos_token_id]

    def _add_masks(self, encoded: dict, max_length):
        """The 2-D attention mask and positions of the original, built only when padding is requested."""
        if max_length is None:
            return
        ids = list(encoded[self.model_input_names[0]])
        length, bos = len(ids), self.bos_token_id
        context = ids.index(bos) if bos in ids else length
        if "attention_mask" not in encoded:
            mask = np.tril(np.ones((1, length, length)))
            mask[:, :, :context] = 1
            encoded["attention_mask"] = np.bool_(mask < 0.5)  # True = masked
        if "position_ids" not in encoded:
            positions = np.arange(length, dtype=np.int64)
            mask_id = self.mask_token_id if self.mask_token_id in ids else self.gmask_token_id
            if mask_id in ids:
                positions[context:] = ids.index(mask_id)  # every token from <sop> on sits at the mask
            blocks = np.concatenate(
                [np.zeros(context, dtype=np.int64), np.arange(1, length - context + 1, dtype=np.int64)]
            )
            encoded["position_ids"] = np.stack([positions, blocks], axis=0)

    def _pad_left(self, encoded: dict, missing: int):
        if "attention_mask" in encoded:
            encoded["attention_mask"] = np.pad(
                encoded["attention_mask"], [(0, 0), (missing, 0), (missing, 0)], mode="constant", constant_values=True
            )
        if "position_ids" in encoded:
            encoded["position_ids"] = np.pad(encoded["position_ids"], [(0, 0), (missing, 0)])
        super()._pad_left(encoded, missing)

    def _config(self) -> dict:
        return {
            **super()._config(),
            "do_lower_case": self.do_lower_case,
            "remove_space": self.remove_space,
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "end_token": self.end_token,
            "mask_token": self.mask_token,
            "gmask_token": self.gmask_token,
            "pad_token": self.pad_token,
            "unk_token": self.unk_token,
            "num_image_tokens": self.num_image_tokens,
        }
