"""The tokenizers of the original ChatGLM-6B (v1), ChatGLM2-6B (v2) and ChatGLM3-6B (v3), without remote code.

THUDM's ``tokenization_chatglm.py`` no longer runs on current transformers (v1 builds its SentencePiece model
after ``super().__init__``, which queries the vocabulary from 4.34 on; all three lack ``_pad``'s
``padding_side`` from 4.45). These classes reproduce what the originals computed under transformers 4.33,
id for id and string for string (checked against /work/shared/golden/tokenizers by
tests/test_chatglm_tokenizer.py), on the same model files and ``tokenizer_config.json``:

* v1 (ChatGLM-6B): ``glmtune/chatglm/tokenization_v1.py``; v2 and v3 (ChatGLM2-6B, ChatGLM3-6B):
  ``tokenization_v2.py``; what they share: ``tokenization_base.py``. This module finds which one a folder needs.

Deliberate differences: ids outside the vocabulary (the models pad their embeddings to 130528 / 65024)
decode to '' instead of raising; ``get_special_tokens_mask`` marks the tokens actually added (the originals
returned zeros of the wrong length); padding on the right raises a GlmtuneError instead of an AssertionError.
"""

import os
import re

from glmtune.chatglm.tokenization_base import VERSION_KEY, _read_json, _read_text
from glmtune.chatglm.tokenization_v1 import ChatGLMTokenizer
from glmtune.chatglm.tokenization_v2 import ChatGLM2Tokenizer, ChatGLM3Tokenizer
from glmtune.errors import GlmtuneError

__all__ = [
    "ChatGLMTokenizer",
    "ChatGLM2Tokenizer",
    "ChatGLM3Tokenizer",
    "VERSION_KEY",
    "detect_version",
    "is_chatglm_tokenizer_folder",
    "load_chatglm_tokenizer",
]

TOKENIZER_CLASSES = {"v1": ChatGLMTokenizer, "v2": ChatGLM2Tokenizer, "v3": ChatGLM3Tokenizer}
_CLASS_NAMES = {"ChatGLMTokenizer", *(cls.__name__ for cls in TOKENIZER_CLASSES.values())}
_REMOTE_CODE = ("tokenization_chatglm.py", "modeling_chatglm.py")


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
    raise GlmtuneError(
        f"{path}: cannot tell a ChatGLM2-6B tokenizer from a ChatGLM3-6B one (same tokenizer.model, "
        f'no name or code saying which); add "{VERSION_KEY}": "v2" or "v3" to its tokenizer_config.json'
    )


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
        raise GlmtuneError(
            f"{path}: a ChatGLM {version} tokenizer needs {cls.vocab_files_names['vocab_file']}, which is missing"
        )
    if (
        version == "v3"
        and "v3_variant" not in kwargs
        and "v3_variant" not in _read_json(os.path.join(path, "tokenizer_config.json"))
    ):
        kwargs["v3_variant"] = _v3_variant(path)
    return cls.from_pretrained(path, **kwargs)
