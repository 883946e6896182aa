"""What the three original ChatGLM tokenizers share: SentencePiece loading, protected special tokens, left
padding, decoding, saving and loading a folder (see glmtune/chatglm/tokenization.py for the overview)."""

import json
import os
import re
import shutil

import sentencepiece as spm
from transformers import AddedToken, PreTrainedTokenizer
from transformers.utils import PaddingStrategy

from glmtune.errors import GlmtuneError

VERSION_KEY = "glmtune_chatglm_version"  # written by save_pretrained: the version, said explicitly
V3_VARIANTS = ("2023-12", "2024-06")
_CONFIG_ONLY_KEYS = ("tokenizer_class", "auto_map", VERSION_KEY)
_HUB_KWARGS = (
    "cache_dir",
    "force_download",
    "local_files_only",
    "token",
    "revision",
    "trust_remote_code",
    "use_fast",
    "subfolder",
    "proxies",
    "_from_auto",
    "_commit_hash",
)
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

    def _decode(
        self,
        token_ids,
        skip_special_tokens: bool = False,
        clean_up_tokenization_spaces=None,
        spaces_between_special_tokens: bool = True,
        **kwargs,
    ) -> str:
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
            [placeholder] * len(token_ids_0), None if token_ids_1 is None else [placeholder] * len(token_ids_1)
        )
        return [0 if index == placeholder else 1 for index in built]

    def _pad(
        self,
        encoded_inputs,
        max_length=None,
        padding_strategy=PaddingStrategy.DO_NOT_PAD,
        pad_to_multiple_of=None,
        padding_side=None,
        return_attention_mask=None,
    ) -> dict:
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
        config_file = os.path.join(
            save_directory, (filename_prefix + "-" if filename_prefix else "") + "tokenizer_config.json"
        )
        with open(config_file, "w", encoding="utf-8") as f:
            json.dump(self._config(), f, indent=2, ensure_ascii=False, sort_keys=True)
            f.write("\n")
        return (config_file, *self.save_vocabulary(save_directory, filename_prefix))

    def _config(self) -> dict:
        config = {
            "tokenizer_class": type(self).__name__,
            VERSION_KEY: self.version,
            "padding_side": self.padding_side,
            "clean_up_tokenization_spaces": self.clean_up_tokenization_spaces,
        }
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
        added = {
            int(i): AddedToken(**{k: v for k, v in token.items() if k != "__type"})
            for i, token in config.pop("added_tokens_decoder", {}).items()
        }
        config.pop("name_or_path", None)  # the hub name it was made from; this folder is what it is now
        model_file = os.path.join(path, cls.vocab_files_names["vocab_file"])
        return cls(
            model_file, *init_inputs, **{**config, "added_tokens_decoder": added, "name_or_path": path, **kwargs}
        )


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
