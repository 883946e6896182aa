"""The ancestors' P-Tuning v2 checkpoint format, read and written beside glmtune's own.

ChatGLM-6B / ChatGLM2-6B ``ptuning/`` save a ``pytorch_model.bin`` holding only the trainable
``transformer.prefix_encoder.*`` tensors (``embedding.weight``, and ``trans.0/2.*`` with
``prefix_projection``) and load it into a base built with the same ``pre_seq_len``. glmtune's
:class:`~glmtune.prefix.PrefixEncoder` has the same parameter names and the same flat layout
(layer, key/value, kv head, head_dim), so converting is renaming: a checkpoint from the ancestors loads
here unchanged, and glmtune writes that file too for ChatGLM bases, so the ancestors' ``web_demo.py`` /
``main.py --ptuning_checkpoint`` read what glmtune trained.
"""

import os

import torch

from glmtune.errors import GlmtuneError

ORIGINAL_WEIGHTS = "pytorch_model.bin"
KEY_PREFIX = "transformer.prefix_encoder."


def has_original_prefix(checkpoint: str) -> bool:
    return os.path.isfile(os.path.join(checkpoint, ORIGINAL_WEIGHTS))


def read_original_prefix(checkpoint: str) -> dict:
    """The prefix tensors of an ancestors' checkpoint, under PrefixEncoder's names."""
    path = os.path.join(checkpoint, ORIGINAL_WEIGHTS)
    try:  # weights_only: a checkpoint from elsewhere must not run code when loaded
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated zip, pickle with code in it, not a torch file at all
        raise GlmtuneError(f"{path} is not a readable weights file: {error}") from None
    weights = {key[len(KEY_PREFIX) :]: value for key, value in state.items() if key.startswith(KEY_PREFIX)}
    if "embedding.weight" not in weights:
        raise GlmtuneError(f"{path} holds no {KEY_PREFIX}embedding.weight: not a P-Tuning v2 checkpoint")
    return weights


def original_prefix_config(weights: dict, checkpoint: str, expected: dict) -> dict:
    """glmtune's prefix config for an ancestors' checkpoint (``weights``: read_original_prefix's), from its
    tensor shapes (it has no config of its own)."""
    pre_seq_len, embedding_dim = weights["embedding.weight"].shape
    projection = "trans.0.weight" in weights
    kv_size = weights["trans.2.weight"].shape[0] if projection else embedding_dim
    expected_kv = expected["num_layers"] * 2 * expected["kv_heads"] * expected["head_dim"]
    if kv_size != expected_kv:
        raise GlmtuneError(
            f"--ptuning_checkpoint {checkpoint} was trained on a different base model (prefix width {kv_size} there, "
            f"{expected_kv} = num_layers x 2 x kv_heads x head_dim here)"
        )
    return {
        **expected,
        "pre_seq_len": pre_seq_len,
        "prefix_projection": projection,
        "embedding_dim": embedding_dim if projection else expected["embedding_dim"],
        "prefix_hidden_size": weights["trans.0.weight"].shape[0] if projection else expected["prefix_hidden_size"],
    }


def save_original_prefix(weights: dict, output_dir: str) -> None:
    """``weights``: the PrefixEncoder's state dict (CPU tensors)."""
    state = {KEY_PREFIX + name: tensor for name, tensor in weights.items()}
    torch.save(state, os.path.join(output_dir, ORIGINAL_WEIGHTS))
