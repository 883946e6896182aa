"""A tokenizer with more tokens than the base has embedding rows: added tokens, as Chinese-LLaMA extends LLaMA's
vocabulary with Chinese words (PromptCBLUE's LLaMA-7B recipe).

The base is resized to the tokenizer before an adapter is attached (transformers' ``resize_token_embeddings``:
new rows drawn around the mean of the old ones, in the embeddings and an untied output head). The new rows are
random, so they mean something only once trained and saved: LoRA with ``--modules_to_save`` covering the
embeddings and the output head, whose trained copies the adapter carries. Everything else is refused before the
base loads: P-Tuning v2 keeps the whole base frozen, and the base alone has nothing for those tokens. Loading an
adapter resizes the base to the tokenizer saved beside it (the one it was trained with) first.
"""

import json
import logging
import os

from glmtune.errors import GlmtuneError

logger = logging.getLogger(__name__)


def added_tokens(model, vocabulary: int) -> int:
    """How many of ``vocabulary`` token ids the base's embeddings have no row for."""
    return max(0, vocabulary - model.get_input_embeddings().num_embeddings)


def embedding_modules(model) -> list[str]:
    """The qualified names of the modules a resize grows: the input embeddings and the output head."""
    grown = [m for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None]
    return [name for name, module in model.named_modules() if any(module is m for m in grown)]


def embedding_names(model) -> list[str]:
    """The short names of :func:`embedding_modules` (as --modules_to_save takes them)."""
    return [name.rsplit(".", 1)[-1] for name in embedding_modules(model)]


def covers(name: str, qualified: str) -> bool:
    """Whether a module name as given on the command line (its last parts) names the module ``qualified``."""
    return qualified == name or qualified.endswith("." + name)


def unsaved_embeddings(model, saved) -> list[str]:
    """The short names of the embedding modules that ``saved`` (modules_to_save) leaves out."""
    return [q.rsplit(".", 1)[-1] for q in embedding_modules(model) if not any(covers(s, q) for s in saved or ())]


FROZEN = "P-Tuning v2 keeps the base frozen, so those tokens would have no trained rows"
BASE_ALONE = "the base alone has no rows for those tokens"


def refuse_frozen(model, vocabulary: int, why: str) -> None:
    """Refuse a run that would use the base's embeddings as they are (``why``: FROZEN or BASE_ALONE)."""
    if added_tokens(model, vocabulary):
        raise GlmtuneError(
            f"{sizes(model, vocabulary)}; {why}: train LoRA with --modules_to_save "
            f"{','.join(embedding_names(model))}, or use a tokenizer the embeddings cover"
        )


def sizes(model, vocabulary: int) -> str:
    """The tokenizer's size and the embeddings', for messages."""
    rows = model.get_input_embeddings().num_embeddings
    added = vocabulary - rows
    return f"the tokenizer has {vocabulary} tokens, the base's embeddings {rows} rows ({added} added tokens)"


def resize(model, vocabulary: int | None) -> None:
    """Grow the embeddings (and an untied output head) to ``vocabulary`` rows; everything stays frozen."""
    rows = model.get_input_embeddings().num_embeddings
    if not vocabulary or vocabulary <= rows:
        return
    model.resize_token_embeddings(vocabulary)
    model.requires_grad_(False)  # the new modules come trainable; what trains is the method's to say
    logger.info("Resized the embeddings from %d to %d rows for the tokenizer's added tokens", rows, vocabulary)


def saved_vocabulary(folder: str) -> int | None:
    """The size of the tokenizer saved beside an adapter (the one it was trained with), None without one."""
    if not os.path.isfile(os.path.join(folder, "tokenizer_config.json")):
        return None
    from glmtune.chatglm.tokenization import is_chatglm_tokenizer_folder, load_chatglm_tokenizer

    try:
        if is_chatglm_tokenizer_folder(folder):
            return len(load_chatglm_tokenizer(folder))
        from transformers import AutoTokenizer

        return len(AutoTokenizer.from_pretrained(folder))
    except (OSError, ValueError) as error:
        raise GlmtuneError(f"{folder}: cannot load the tokenizer saved with the adapter: {error}") from None


def saved_modules(folder: str) -> list[str]:
    """The modules_to_save of the adapter in ``folder`` (its adapter_config.json)."""
    try:
        with open(os.path.join(folder, "adapter_config.json"), encoding="utf-8") as f:
            return list(json.load(f).get("modules_to_save") or [])
    except (OSError, ValueError):
        return []  # loading the adapter reports a missing or broken config
