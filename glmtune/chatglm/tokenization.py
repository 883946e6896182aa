"""The tokenizers of the original ChatGLM-6B (v1), ChatGLM2-6B (v2) and ChatGLM3-6B (v3), without remote code.

THUDM's ``tokenization_chatglm.py`` no longer runs on current transformers (v1 builds its SentencePiece model
after ``super().__init__``, which queries the vocabulary from 4.34 on; all three lack ``_pad``'s
``padding_side`` from 4.45). These classes reproduce what the originals computed under transformers 4.33,
id for id and string for string (checked against /work/shared/golden/tokenizers by
tests/test_chatglm_tokenizer.py), on the same model files and ``tokenizer_config.json``:

* v1 (``ice_text.model``, 130344 pieces): ``\\n`` becomes ``<n>``, ``\\t`` ``<|tab|>`` and runs of 2-80 spaces
  ``<|blank_n|>`` before SentencePiece, and back when decoding; its normaliser is lossy (NFKC, ``\\r`` and a
  zero-width space become spaces, outer spaces vanish). Text ids are SentencePiece ids shifted by
  ``num_image_tokens`` (0 in the final release, whose model file holds the specials ``[MASK]`` 130000 ...
  ``<eop>`` 130005 itself). ``[gMASK] <sop>`` are *appended*. Its five named special tokens (``<sop>``,
  ``<eop>``, ``<unk>``, ``<pad>``, ``[MASK]``) are never split when they occur in text, and transformers 4.33
  stripped the whitespace on both sides of them; pad ids are dropped before decoding; decoding cleans up
  tokenization spaces (4.33's default). Padding builds a boolean [1, L, L] mask (True = masked,
  bidirectional up to ``<sop>``) and 2-D positions [2, L], only when padding is requested.
* v2 (``tokenizer.model``, 64789 pieces + ``[MASK] [gMASK] [sMASK] sop eop`` at 64789-64793): ``[gMASK] sop``
  are *prepended*; eos ``</s>`` 2, pad ``<unk>`` 0, no bos, and ``unk_token_id`` None (the original never set
  it). Specials, eos, bos and pad decode to ''. Every encoding carries ``attention_mask`` and ``position_ids``.
* v3 (the same model file): v2 plus ``<|system|> <|user|> <|assistant|> <|observation|>`` (64794-64797);
  specials decode to their names. Role-token text in plain input is split like any text unless
  ``encode_special_tokens=True``; ``v3_variant="2024-06"`` selects the 2024 copy of the code, where that
  option also matches ``[MASK] [gMASK] [sMASK] sop eop`` (even inside words) and ``unk_token_id`` is 0.

Deliberate differences: ids outside the vocabulary (the models pad their embeddings to 130528 / 65024)
decode to '' instead of raising; ``get_special_tokens_mask`` marks the tokens actually added (the originals
returned zeros of the wrong length); padding on the right raises a GlmtuneError instead of an AssertionError.
"""

import json
import os
import re
import shutil

import numpy as np
import sentencepiece as spm
from transformers import AddedToken, PreTrainedTokenizer
from transformers.utils import PaddingStrategy

from glmtune.errors import GlmtuneError

VERSION_KEY = "glmtune_chatglm_version"  # written by save_pretrained: the version, said explicitly
V3_VARIANTS = ("2023-12", "2024-06")
_CONFIG_ONLY_KEYS = ("tokenizer_class", "auto_map", VERSION_KEY)
_HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "trust_remote_code",
               "use_fast", "subfolder", "proxies", "_from_auto", "_commit_hash")
_VERY_LARGE = int(1e29)  # below transformers' "no limit" model_max_length: a real limit, worth saving


def _split_protected(text: str, protected: dict) -> list:
    """``text`` cut around the ``protected`` strings (longest first), as transformers 4.33 did: a protected
    token with ``(lstrip, rstrip)`` flags eats the whitespace on its left / right. Odd items are tokens."""
    if not protected:
        return [text]
    pattern = "|".join(re.escape(token) for token in sorted(protected, key=len, reverse=True))
    parts = re.split(f"({pattern})", text)
    for i in range(1, len(parts), 2):
        lstrip, rstrip = protected[parts[i]]
        if rstrip:
            parts[i + 1] = parts[i + 1].lstrip()
        if lstrip:
            parts[i - 1] = parts[i - 1].rstrip()
    return parts


class _ChatGLMTokenizerBase(PreTrainedTokenizer):
    """What the three share: SentencePiece loading, 4.33's tokenize/decode rules, left padding, saving."""

    version = ""
    vocab_files_names = {"vocab_file": "tokenizer.model"}
    model_input_names = ["input_ids", "attention_mask", "position_ids"]
    padding_side = "left"

    def __init__(self, vocab_file: str, **kwargs):
        if not vocab_file or not os.path.isfile(vocab_file):
            raise GlmtuneError(f"{vocab_file}: no SentencePiece model file for {type(self).__name__}")
        # Loaded before super().__init__, which already asks for the vocabulary (v1's original did it after).
        self.vocab_file = vocab_file
        try:
            self.sp = spm.SentencePieceProcessor(model_file=vocab_file)
        except (RuntimeError, OSError) as error:
            raise GlmtuneError(f"{vocab_file}: not a SentencePiece model ({str(error).splitlines()[0]})") from None
        self._pieces = self.sp.vocab_size()  # asked per token: kept as an int
        self._vocab = None
        self._loading = True
        self._after_load()
        for key in _CONFIG_ONLY_KEYS:
            kwargs.pop(key, None)
        kwargs.setdefault("padding_side", "left")
        super().__init__(**kwargs)
        self._loading = False

    def _after_load(self):
        """Set up what depends on the SentencePiece model, before transformers' __init__ runs."""

    # -- vocabulary ---------------------------------------------------------------------------------------
    def get_vocab(self) -> dict:
        """token -> id over the whole vocabulary, as the originals built it: ids that print as the same token
        (v2: '' for eos, bos, pad and the specials) keep only the last."""
        if self._vocab is None:
            self._vocab = {self._convert_id_to_token(i): i for i in range(self.vocab_size)}
        return {**self._vocab, **self._added_tokens_encoder}

    def __len__(self) -> int:
        return self.vocab_size + sum(1 for index in self._added_tokens_decoder if index >= self.vocab_size)

    def _known_id(self, token: str):
        """The id of a token of the base vocabulary, else None."""
        index = self._convert_token_to_id(token)
        return None if index == self._convert_token_to_id("<unk>") and token != "<unk>" else index

    def _add_tokens(self, new_tokens, special_tokens: bool = False) -> int:
        """Tokens the user adds, with 4.33's bookkeeping: new ones get ids after the vocabulary and, like special
        tokens already in it, are never split in text (the whitespace around them goes as their AddedToken
        lstrip/rstrip say: today's rule, the originals added none). During __init__ transformers registers
        the named special tokens here; ours are in the vocabulary, and which of them text may spell is the
        originals' rule, ``_legacy_protected``."""
        if self._loading:
            return 0
        added = 0
        for token in new_tokens:
            if not isinstance(token, AddedToken):
                token = AddedToken(str(token), special=special_tokens, normalized=not special_tokens)
            if not token.content or token.content in self._added_tokens_encoder:
                continue
            known = self._known_id(token.content)
            if known is not None and not token.special:
                continue  # an ordinary piece of the vocabulary: 4.33 left it alone
            index = known if known is not None else len(self)
            added += known is None
            if token.special and token.content not in self.all_special_tokens:
                self._extra_special_tokens.append(token)
            self._added_tokens_decoder[index] = token
            self._added_tokens_encoder[token.content] = index
        return added

    # -- text -> tokens -----------------------------------------------------------------------------------
    _legacy_protected: tuple = ()  # named special tokens that transformers 4.33 never split, stripping around

    def tokenize(self, text: str, **kwargs) -> list:
        """4.33's rule: protected tokens stay whole, the text between them goes to ``_tokenize`` piece by piece."""
        split_special_tokens = kwargs.pop("split_special_tokens", self.split_special_tokens)
        text, kwargs = self.prepare_for_tokenization(text, **kwargs)
        protected = {} if split_special_tokens else self._protected()
        tokens = []
        for i, part in enumerate(_split_protected(text, protected)):
            if i % 2:
                tokens.append(part)
            elif part:
                tokens.extend(self._tokenize(part))
        return tokens

    def _protected(self) -> dict:
        protected = {token: (True, True) for token in self._legacy_protected}
        for token in self._added_tokens_decoder.values():
            protected[token.content] = (token.lstrip, token.rstrip)
        return protected

    # -- ids -> text --------------------------------------------------------------------------------------
    def _skipped_ids(self) -> set:
        """What ``skip_special_tokens`` drops: 4.33's ``all_special_ids`` (v2/v3: none, their named special
        tokens were properties it did not see) plus special tokens the user added."""
        ids = {self._convert_token_to_id(token) for token in self._legacy_protected}
        return ids | {i for i, token in self._added_tokens_decoder.items() if token.special}

    def _decode(self, token_ids, skip_special_tokens: bool = False, clean_up_tokenization_spaces=None,
                spaces_between_special_tokens: bool = True, **kwargs) -> str:
        """4.33's slow decode: pieces through SentencePiece in runs, tokens added past the vocabulary as
        themselves, joined by spaces."""
        ids = [token_ids] if isinstance(token_ids, int) else [int(i) for i in token_ids]
        skipped = self._skipped_ids() if skip_special_tokens else set()
        added = {i: t for i, t in self._added_tokens_decoder.items() if i >= self.vocab_size}
        texts, run = [], []
        for index in ids:
            if index in skipped:
                continue
            if index in added:
                texts += [self.convert_tokens_to_string(run)] if run else []
                texts.append(added[index].content)
                run = []
            else:
                run.append(self._convert_id_to_token(index))
        texts += [self.convert_tokens_to_string(run)] if run else []
        text = (" " if spaces_between_special_tokens else "").join(texts)
        if clean_up_tokenization_spaces is None:
            clean_up_tokenization_spaces = self.clean_up_tokenization_spaces
        return self.clean_up_tokenization(text) if clean_up_tokenization_spaces else text

    # -- special tokens and padding -----------------------------------------------------------------------
    def get_special_tokens_mask(self, token_ids_0, token_ids_1=None, already_has_special_tokens=False):
        if already_has_special_tokens:
            return super().get_special_tokens_mask(token_ids_0, token_ids_1, already_has_special_tokens=True)
        placeholder = -1  # no real id: whatever build_inputs adds around the placeholders is special
        built = self.build_inputs_with_special_tokens(
            [placeholder] * len(token_ids_0), None if token_ids_1 is None else [placeholder] * len(token_ids_1))
        return [0 if index == placeholder else 1 for index in built]

    def _pad(self, encoded_inputs, max_length=None, padding_strategy=PaddingStrategy.DO_NOT_PAD,
             pad_to_multiple_of=None, padding_side=None, return_attention_mask=None) -> dict:
        """Left padding only, as the originals (they assert it): their position ids count from the first real
        token. ``return_attention_mask`` is ignored, as they ignored it."""
        side = padding_side or self.padding_side
        if side != "left":
            raise GlmtuneError(f"{type(self).__name__} pads on the left only (padding_side={side!r})")
        ids = encoded_inputs[self.model_input_names[0]]
        if padding_strategy == PaddingStrategy.LONGEST:
            max_length = len(ids)
        if max_length is not None and pad_to_multiple_of and max_length % pad_to_multiple_of:
            max_length = (max_length // pad_to_multiple_of + 1) * pad_to_multiple_of
        self._add_masks(encoded_inputs, max_length)
        missing = max_length - len(ids) if max_length is not None else 0
        if padding_strategy != PaddingStrategy.DO_NOT_PAD and missing > 0:
            self._pad_left(encoded_inputs, missing)
        return encoded_inputs

    def _pad_left(self, encoded: dict, missing: int):
        if "token_type_ids" in encoded:
            encoded["token_type_ids"] = [self.pad_token_type_id] * missing + encoded["token_type_ids"]
        if "special_tokens_mask" in encoded:
            encoded["special_tokens_mask"] = [1] * missing + encoded["special_tokens_mask"]
        name = self.model_input_names[0]
        encoded[name] = [self.pad_token_id] * missing + list(encoded[name])

    # -- saving and loading -------------------------------------------------------------------------------
    def save_vocabulary(self, save_directory: str, filename_prefix=None) -> tuple:
        name = (filename_prefix + "-" if filename_prefix else "") + self.vocab_files_names["vocab_file"]
        target = os.path.join(save_directory, name)
        if os.path.abspath(target) != os.path.abspath(self.vocab_file):
            shutil.copyfile(self.vocab_file, target)
        return (target,)

    def save_pretrained(self, save_directory, filename_prefix=None, **kwargs) -> tuple:
        """The model file and a tokenizer_config.json naming the version, which ``load_chatglm_tokenizer`` and
        ``from_pretrained`` read back."""
        os.makedirs(save_directory, exist_ok=True)
        config_file = os.path.join(save_directory, (filename_prefix + "-" if filename_prefix else "") + "tokenizer_config.json")
        with open(config_file, "w", encoding="utf-8") as f:
            json.dump(self._config(), f, indent=2, ensure_ascii=False, sort_keys=True)
            f.write("\n")
        return (config_file, *self.save_vocabulary(save_directory, filename_prefix))

    def _config(self) -> dict:
        config = {"tokenizer_class": type(self).__name__, VERSION_KEY: self.version, "padding_side": self.padding_side,
                  "clean_up_tokenization_spaces": self.clean_up_tokenization_spaces}
        if self.model_max_length < _VERY_LARGE:
            config["model_max_length"] = self.model_max_length
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        if self._added_tokens_decoder:
            config["added_tokens_decoder"] = {str(i): t.__getstate__() for i, t in self._added_tokens_decoder.items()}
        if self._extra_special_tokens:
            config["extra_special_tokens"] = [str(token) for token in self._extra_special_tokens]
        return config

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *init_inputs, **kwargs):
        """From a local folder (the model file + an optional tokenizer_config.json); nothing is downloaded."""
        path = str(pretrained_model_name_or_path)
        if not os.path.isdir(path):
            raise GlmtuneError(f"{path}: not a folder; ChatGLM tokenizers load from a local model folder")
        for key in _HUB_KWARGS:
            kwargs.pop(key, None)
        config = _read_json(os.path.join(path, "tokenizer_config.json"), strict=True)
        added = {int(i): AddedToken(**{k: v for k, v in token.items() if k != "__type"})
                 for i, token in config.pop("added_tokens_decoder", {}).items()}
        config.pop("name_or_path", None)  # the hub name it was made from; this folder is what it is now
        model_file = os.path.join(path, cls.vocab_files_names["vocab_file"])
        return cls(model_file, *init_inputs, **{**config, "added_tokens_decoder": added, "name_or_path": path, **kwargs})


class ChatGLMTokenizer(_ChatGLMTokenizerBase):
    """ChatGLM-6B's tokenizer (the final 2023-05 revision of THUDM/chatglm-6b)."""

    version = "v1"
    vocab_files_names = {"vocab_file": "ice_text.model"}
    _legacy_protected = ("<sop>", "<eop>", "<unk>", "<pad>", "[MASK]")  # bos, eos, unk, pad, mask
    MAX_BLANK = 80  # the longest space run with its own <|blank_n|> piece

    def __init__(self, vocab_file, do_lower_case=False, remove_space=False, bos_token="<sop>", eos_token="<eop>",
                 end_token="</s>", mask_token="[MASK]", gmask_token="[gMASK]", pad_token="<pad>", unk_token="<unk>",
                 num_image_tokens=0, clean_up_tokenization_spaces=True, **kwargs):
        self.do_lower_case, self.remove_space, self.num_image_tokens = do_lower_case, remove_space, num_image_tokens
        self.gmask_token, self.end_token = gmask_token, end_token
        self._legacy_protected = tuple(t for t in (bos_token, eos_token, unk_token, pad_token, mask_token) if t)
        super().__init__(vocab_file, bos_token=bos_token, eos_token=eos_token, mask_token=mask_token,
                         pad_token=pad_token, unk_token=unk_token,
                         clean_up_tokenization_spaces=clean_up_tokenization_spaces, **kwargs)

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
            blocks = np.concatenate([np.zeros(context, dtype=np.int64), np.arange(1, length - context + 1, dtype=np.int64)])
            encoded["position_ids"] = np.stack([positions, blocks], axis=0)

    def _pad_left(self, encoded: dict, missing: int):
        if "attention_mask" in encoded:
            encoded["attention_mask"] = np.pad(encoded["attention_mask"], [(0, 0), (missing, 0), (missing, 0)],
                                               mode="constant", constant_values=True)
        if "position_ids" in encoded:
            encoded["position_ids"] = np.pad(encoded["position_ids"], [(0, 0), (missing, 0)])
        super()._pad_left(encoded, missing)

    def _config(self) -> dict:
        return {**super()._config(), "do_lower_case": self.do_lower_case, "remove_space": self.remove_space,
                "bos_token": self.bos_token, "eos_token": self.eos_token, "end_token": self.end_token,
                "mask_token": self.mask_token, "gmask_token": self.gmask_token, "pad_token": self.pad_token,
                "unk_token": self.unk_token, "num_image_tokens": self.num_image_tokens}


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
        self._commands = {"<bos>": self.sp.bos_id(), "<eos>": self.sp.eos_id(), "<pad>": self.sp.unk_id(),
                          **self.special_token_ids}
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
        return [piece for i, part in enumerate(parts) if part
                for piece in ([part] if i % 2 else self.sp.EncodeAsPieces(part))]

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


TOKENIZER_CLASSES = {"v1": ChatGLMTokenizer, "v2": ChatGLM2Tokenizer, "v3": ChatGLM3Tokenizer}
_CLASS_NAMES = {"ChatGLMTokenizer", *(cls.__name__ for cls in TOKENIZER_CLASSES.values())}
_REMOTE_CODE = ("tokenization_chatglm.py", "modeling_chatglm.py")


def _read_json(path: str, strict: bool = False) -> dict:
    """A JSON object file as a dict; {} when absent (and, unless ``strict``, when unreadable)."""
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as error:
        if strict:
            raise GlmtuneError(f"{path}: not a readable JSON file ({error})") from None
        return {}
    if not isinstance(data, dict):
        if strict:
            raise GlmtuneError(f"{path}: expected a JSON object")
        return {}
    return data


def _read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def is_chatglm_tokenizer_folder(path) -> bool:
    """Whether ``path`` holds an original ChatGLM tokenizer (or one glmtune saved): its tokenizer_config.json
    names a ChatGLM tokenizer class, or, without a class there, ``ice_text.model`` / a ``tokenizer.model``
    without a ``tokenizer.json`` is present."""
    path = str(path)
    if not os.path.isdir(path):
        return False
    tokenizer_class = _read_json(os.path.join(path, "tokenizer_config.json")).get("tokenizer_class")
    if tokenizer_class:
        return tokenizer_class in _CLASS_NAMES
    has = lambda name: os.path.isfile(os.path.join(path, name))  # noqa: E731
    return has("ice_text.model") or (has("tokenizer.model") and not has("tokenizer.json"))


def detect_version(path) -> str:
    """'v1', 'v2' or 'v3' for the folder, from these signals in order:

    1. tokenizer_config.json's ``glmtune_chatglm_version`` (written by glmtune) or a glmtune class name;
    2. ``ice_text.model`` -> v1 (only ChatGLM-6B has it);
    3. with ``tokenizer.model`` (v2 and v3 share that file byte for byte): the folder's remote code
       (tokenization_chatglm.py, modeling_chatglm.py) -> v3 if it mentions ``<|user|>`` or
       ``build_chat_input``, else v2;
    4. the model's name: tokenizer_config.json ``name_or_path``, config.json ``_name_or_path`` (or
       ``name_or_path``) containing "chatglm3" -> v3, "chatglm2" -> v2.
    Without any of them the folder is ambiguous and a GlmtuneError says how to mark it."""
    path = str(path)
    config = _read_json(os.path.join(path, "tokenizer_config.json"), strict=True)
    named = {cls.__name__: v for v, cls in TOKENIZER_CLASSES.items() if v != "v1"}
    if config.get(VERSION_KEY) or config.get("tokenizer_class") in named:
        return config.get(VERSION_KEY) or named[config["tokenizer_class"]]
    if os.path.isfile(os.path.join(path, "ice_text.model")):
        return "v1"
    if not os.path.isfile(os.path.join(path, "tokenizer.model")):
        raise GlmtuneError(f"{path}: no ChatGLM tokenizer file (ice_text.model or tokenizer.model)")
    code = [_read_text(os.path.join(path, name)) for name in _REMOTE_CODE if os.path.isfile(os.path.join(path, name))]
    if code:
        return "v3" if any("<|user|>" in text or "build_chat_input" in text for text in code) else "v2"
    model_config = _read_json(os.path.join(path, "config.json"))
    names = [config.get("name_or_path"), model_config.get("_name_or_path"), model_config.get("name_or_path")]
    for name in (str(n).lower() for n in names if n):
        if "chatglm3" in name or "chatglm2" in name:
            return "v3" if "chatglm3" in name else "v2"
    raise GlmtuneError(f"{path}: cannot tell a ChatGLM2-6B tokenizer from a ChatGLM3-6B one (same tokenizer.model, "
                       f"no name or code saying which); add \"{VERSION_KEY}\": \"v2\" or \"v3\" to its tokenizer_config.json")


def _v3_variant(path: str) -> str:
    """'2024-06' when the folder's tokenization_chatglm.py is the 2024 copy (its special-token pattern covers
    every special token, not only the roles), else '2023-12'."""
    code = _read_text(os.path.join(path, "tokenization_chatglm.py"))
    return "2024-06" if re.search(r"re\.escape\(token\)\s+for\s+token\s+in\s+special_tokens\]", code) else "2023-12"


def load_chatglm_tokenizer(path, version: str = None, **kwargs):
    """The tokenizer of an original ChatGLM folder, version from ``detect_version`` unless given."""
    path = str(path)
    if not os.path.isdir(path):
        raise GlmtuneError(f"{path}: not a folder")
    version = version or detect_version(path)
    if version not in TOKENIZER_CLASSES:
        raise GlmtuneError(f"{path}: ChatGLM tokenizer version {version!r}: expected v1, v2 or v3")
    cls = TOKENIZER_CLASSES[version]
    model_file = os.path.join(path, cls.vocab_files_names["vocab_file"])
    if not os.path.isfile(model_file):
        raise GlmtuneError(f"{path}: a ChatGLM {version} tokenizer needs {cls.vocab_files_names['vocab_file']}, which is missing")
    if version == "v3" and "v3_variant" not in kwargs and "v3_variant" not in _read_json(os.path.join(path, "tokenizer_config.json")):
        kwargs["v3_variant"] = _v3_variant(path)
    return cls.from_pretrained(path, **kwargs)
