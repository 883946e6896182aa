"""P-Tuning v2: a trainable prefix of keys and values in front of every attention layer of a frozen base.

* **What is added**: a :class:`PrefixEncoder` on ``model.prefix_encoder`` (float32 whatever the base's dtype or
  quantization), whose output every attention layer reads through :func:`prefix_attention`.
* **What trains**: the prefix encoder only; every weight of the base is frozen.
* **What is saved**: ``prefix_encoder.safetensors`` + ``prefix_config.json`` (:func:`save_checkpoint`); for the
  original ChatGLM models also the ancestors' ``pytorch_model.bin``, which their ``ptuning/`` code loads
  (written only where it can: not for a prefix projected through a width other than ``hidden_size``).

Why our own and not PEFT's ``PrefixTuningConfig``: PEFT feeds the prefix in through the KV cache, which
refuses gradient checkpointing (transformers 5.17 / peft 0.21) and shifts every real token's position by
``pre_seq_len``. Here the prefix is joined to each layer's keys/values inside the attention function,
after rotary embedding and after the cache update, exactly as ChatGLM's P-Tuning v2 does:

* prefix keys get no rotary embedding; real tokens keep their own positions;
* every query sees the whole prefix; padding and causality among real tokens are masked as usual;
* the KV cache holds only real tokens, so batched, left-padded generation works unchanged;
* the prefix is computed once per forward outside the decoder layers, so checkpointed layers read the
  same tensor when they are recomputed (non-reentrant checkpointing carries its gradient).

It works with any transformers model whose attention goes through ``AttentionInterface`` and knows its
``layer_idx`` (GLM, GLM-4, Llama, Qwen2, Mistral, ...) and with glmtune's ChatGLM classes.
"""

import json
import logging
import os

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from glmtune import chatglm
from glmtune.arguments import PtuningArguments
from glmtune.errors import GlmtuneError
from glmtune.files import read_json

logger = logging.getLogger(__name__)

ATTENTION_NAME = "glmtune_prefix_sdpa"
WEIGHTS_FILE = "prefix_encoder.safetensors"
CONFIG_FILE = "prefix_config.json"
# What a prefix must match in the base it is loaded into (checkpoints may predate vocab_size/hidden_size).
SHAPE_KEYS = ("num_layers", "kv_heads", "head_dim", "hidden_size", "vocab_size")


# ----------------------------------------------------------------------------- the module


class PrefixEncoder(nn.Module):
    """``pre_seq_len`` rows -> per-layer prefix keys and values.

    Without projection the embedding row is the prefix itself (width ``num_layers * 2 * kv_heads *
    head_dim``); with projection an embedding of ``embedding_dim`` goes through Linear-Tanh-Linear.
    The output layout matches ChatGLM's: the flat width is (layer, key/value, head, head_dim).
    """

    def __init__(
        self,
        pre_seq_len,
        num_layers,
        kv_heads,
        head_dim,
        projection=False,
        embedding_dim=None,
        hidden_size=None,
        dropout=0.0,
    ):
        super().__init__()
        self.shape = (num_layers, 2, kv_heads, head_dim)
        kv_size = num_layers * 2 * kv_heads * head_dim
        if projection:
            self.embedding = nn.Embedding(pre_seq_len, embedding_dim)
            self.trans = nn.Sequential(
                nn.Linear(embedding_dim, hidden_size), nn.Tanh(), nn.Linear(hidden_size, kv_size)
            )
        else:
            self.embedding = nn.Embedding(pre_seq_len, kv_size)
        self.dropout = nn.Dropout(dropout)

    def forward(self) -> torch.Tensor:
        """Returns ``[num_layers, 2, kv_heads, pre_seq_len, head_dim]``."""
        prefix = self.embedding.weight
        if hasattr(self, "trans"):
            prefix = self.trans(prefix)
        prefix = self.dropout(prefix)
        return prefix.view(prefix.shape[0], *self.shape).permute(1, 2, 3, 0, 4)


def prefix_config(model_config, args: PtuningArguments) -> dict:
    """The prefix's settings and the base shape it fits (written to ``prefix_config.json``)."""
    hidden_size = model_config.hidden_size
    heads = model_config.num_attention_heads
    num_layers = model_config.num_hidden_layers
    kv_heads = getattr(model_config, "num_key_value_heads", None) or heads
    head_dim = getattr(model_config, "head_dim", None) or hidden_size // heads
    return {
        "pre_seq_len": args.pre_seq_len,
        "prefix_projection": args.prefix_projection,
        "prefix_hidden_size": args.prefix_hidden_size or hidden_size,
        "embedding_dim": _embedding_dim(model_config, num_layers * 2 * kv_heads * head_dim),
        "num_layers": num_layers,
        "kv_heads": kv_heads,
        "head_dim": head_dim,
        "hidden_size": hidden_size,
        "vocab_size": model_config.vocab_size,
    }


def _embedding_dim(model_config, kv_size: int) -> int:
    """Width of the prefix embedding when the prefix is projected: ChatGLM-6B projects hidden -> hidden -> kv,
    ChatGLM2/3-6B kv -> hidden -> kv (their checkpoints' shapes); other models use hidden_size."""
    if chatglm.is_chatglm_config(model_config) and chatglm.architecture(model_config.to_dict()) == "v2":
        return kv_size
    return model_config.hidden_size


# ----------------------------------------------------------------------------- attaching it


def add_prefix_encoder(model, args: PtuningArguments):
    """Freeze the base, attach a float32 prefix encoder (loaded from --ptuning_checkpoint if given)."""
    config = prefix_config(model.config, args)
    checkpoint, original_weights = args.ptuning_checkpoint, None
    if checkpoint and _is_original_format(checkpoint):  # read once: its shapes are its only config
        original_weights = read_original_prefix(checkpoint)
    if checkpoint:
        config = _checked_checkpoint_config(checkpoint, config, args, original_weights)
    encoder = PrefixEncoder(
        config["pre_seq_len"],
        config["num_layers"],
        config["kv_heads"],
        config["head_dim"],
        projection=config["prefix_projection"],
        embedding_dim=config["embedding_dim"],
        hidden_size=config["prefix_hidden_size"],
        dropout=args.prefix_dropout,
    ).to(device=model.device, dtype=torch.float32)  # trainable weights stay fp32 whatever the base dtype
    encoder.glmtune_config = config
    encoder.train(model.training)  # a new module starts in training mode; follow the model's
    model.requires_grad_(False)
    attach_prefix(model, encoder)
    if checkpoint:
        load_weights(model, checkpoint, original_weights)
    _gather_in_zero3_forward(encoder)
    return model


def attention_layers(model) -> list:
    """The model's self-attention modules, one per decoder layer, in layer order."""
    layers = [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "config") and _projects_qkv(m)]
    return sorted(layers, key=lambda m: m.layer_idx)


def _projects_qkv(module) -> bool:
    return any(hasattr(module, name) for name in ("q_proj", "qkv_proj", "query_key_value", "c_attn"))


def attach_prefix(model, encoder: PrefixEncoder) -> None:
    """Install ``encoder`` on ``model``: every forward computes the prefix once, every layer reads it."""
    register_attention()
    layers = attention_layers(model)
    num_layers = encoder.shape[0]
    if len(layers) != num_layers:
        raise ValueError(
            f"P-Tuning v2 found {len(layers)} attention layers with a layer index in this model, expected "
            f"{num_layers}: its attention does not go through transformers' AttentionInterface"
        )
    model.prefix_encoder = encoder
    model.set_attn_implementation(ATTENTION_NAME)

    def compute_prefix(module, args, kwargs):
        for layer, key_value in zip(layers, encoder()):
            layer.prefix_key_value = key_value

    # On the decoder, not the LM wrapper: the target-token loss calls through to it, and so does generate().
    model.get_decoder().register_forward_pre_hook(compute_prefix, with_kwargs=True)


def is_prefix_tuned(model) -> bool:
    return hasattr(model, "prefix_encoder")


def _gather_in_zero3_forward(encoder) -> None:
    """ZeRO-3 partitions every weight and gathers a module's own weights for its forward; the prefix
    encoder reads its embedding's weight without calling the embedding, so it must gather that one too."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    if is_deepspeed_zero3_enabled():
        import deepspeed

        deepspeed.zero.register_external_parameter(encoder, encoder.embedding.weight)


# ----------------------------------------------------------------------------- the attention function


def prefix_attention(module, query, key, value, attention_mask, **kwargs):
    """transformers' SDPA attention over [prefix keys/values] + the layer's own (``module.prefix_key_value``,
    left there by :func:`attach_prefix`; a layer without one is plain SDPA attention).

    Reading the prefix from the module rather than indexing by ``layer_idx`` keeps the code identical for
    every layer, so ``torch.compile`` compiles it once.
    """
    prefix = getattr(module, "prefix_key_value", None)
    if prefix is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    key, value = join_prefix(prefix, key, value)
    mask = _mask_with_prefix(attention_mask, query, key, prefix.shape[2])
    return sdpa_attention_forward(module, query, key, value, mask, is_causal=False, **kwargs)


def join_prefix(prefix, key, value) -> tuple:
    """``prefix`` ``[2, kv_heads, pre_seq_len, head_dim]`` in front of every row's keys and values."""
    prefix_keys, prefix_values = prefix.to(key.dtype).unsqueeze(1).expand(-1, key.shape[0], -1, -1, -1)
    return torch.cat([prefix_keys, key], dim=2), torch.cat([prefix_values, value], dim=2)


def _mask_with_prefix(attention_mask, query, key, pre_seq_len):
    """Prepend ``pre_seq_len`` always-visible columns to the real tokens' mask.

    ``key`` already holds the prefix. transformers passes ``None`` when the mask is purely causal (it
    relies on SDPA's ``is_causal``, which aligns top-left and so would be wrong once the prefix makes keys
    longer than queries): build the causal mask explicitly then, aligning the queries to the last keys.
    """
    q_len, k_len = query.shape[2], key.shape[2] - pre_seq_len
    if attention_mask is None:
        rows = torch.arange(q_len, device=query.device)[:, None] + (k_len - q_len)
        attention_mask = (torch.arange(k_len, device=query.device)[None, :] <= rows)[None, None]
    attention_mask = attention_mask[..., -k_len:]
    shape = (*attention_mask.shape[:-1], pre_seq_len)
    if attention_mask.dtype == torch.bool:
        visible = torch.ones(shape, dtype=torch.bool, device=attention_mask.device)
    else:  # additive float mask: 0 means visible
        visible = torch.zeros(shape, dtype=attention_mask.dtype, device=attention_mask.device)
    return torch.cat([visible, attention_mask], dim=-1)


def register_attention() -> None:
    """Make ``ATTENTION_NAME`` known to transformers (idempotent), its masks built as for SDPA."""
    AttentionInterface.register(ATTENTION_NAME, prefix_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


# ----------------------------------------------------------------------------- checkpoints


def save_checkpoint(model, output_dir: str) -> None:
    """The prefix encoder's weights and config (and the ancestors' file for ChatGLM bases) in ``output_dir``."""
    os.makedirs(output_dir, exist_ok=True)
    encoder = model.prefix_encoder
    weights = {name: tensor.detach().contiguous().cpu() for name, tensor in encoder.state_dict().items()}
    save_file(weights, os.path.join(output_dir, WEIGHTS_FILE), metadata={"format": "pt"})
    if chatglm.is_chatglm_config(model.config):  # also readable by the ancestors' own ptuning code
        unreadable = original_cannot_load(encoder.glmtune_config)
        if unreadable:
            logger.info("No %s in %s: %s", ORIGINAL_WEIGHTS, output_dir, unreadable)
        else:
            save_original_prefix(weights, output_dir)
    with open(os.path.join(output_dir, CONFIG_FILE), "w", encoding="utf-8") as f:
        json.dump(encoder.glmtune_config, f, indent=2)


def load_weights(model, checkpoint: str, original_weights=None) -> None:
    """``original_weights``: an ancestors' checkpoint's tensors when already read (else read here)."""
    path = os.path.join(checkpoint, WEIGHTS_FILE)
    if original_weights is not None or _is_original_format(checkpoint):
        path = os.path.join(checkpoint, ORIGINAL_WEIGHTS)
        weights = original_weights if original_weights is not None else read_original_prefix(checkpoint)
    else:
        weights = _read_weights(checkpoint, path)
    try:
        model.prefix_encoder.load_state_dict(weights, strict=True)
    except RuntimeError as error:
        raise GlmtuneError(f"{path} does not fit this prefix encoder: {error}") from None


def is_checkpoint(folder: str) -> bool:
    """A P-Tuning v2 checkpoint, glmtune's or the ancestors'."""
    return os.path.isfile(os.path.join(folder, CONFIG_FILE)) or _is_original_format(folder)


def _read_weights(checkpoint: str, path: str) -> dict:
    try:
        return load_file(path)
    except FileNotFoundError:
        raise GlmtuneError(f"{checkpoint}: no {WEIGHTS_FILE} in it") from None
    except Exception as error:  # safetensors raises its own error types for truncated files
        raise GlmtuneError(f"{path} is corrupt: {error}") from None


def _checked_checkpoint_config(checkpoint: str, expected: dict, args: PtuningArguments, original_weights=None) -> dict:
    """The checkpoint's prefix config, after checking it fits this base and the flags given
    (``original_weights``: an ancestors' checkpoint's tensors, None for glmtune's own format)."""
    if original_weights is not None:
        saved = original_prefix_config(original_weights, checkpoint, expected)
    else:
        saved = _read_json(os.path.join(checkpoint, CONFIG_FILE), "--ptuning_checkpoint")
    mismatched = [key for key in SHAPE_KEYS if key in saved and saved[key] != expected[key]]
    if mismatched:
        details = ", ".join(f"{key} {saved[key]} there, {expected[key]} here" for key in mismatched)
        raise GlmtuneError(f"--ptuning_checkpoint {checkpoint} was trained on a different base model ({details})")
    flags = {"pre_seq_len": args.pre_seq_len, "prefix_projection": args.prefix_projection or None}
    for key, value in flags.items():
        if value is not None and saved.get(key) != value:
            raise GlmtuneError(
                f"--ptuning_checkpoint {checkpoint} was trained with {key} {saved.get(key)}, but --{key} is {value}: "
                f"use the training value (or leave the flag out to take it from the checkpoint)"
            )
    kept = ("pre_seq_len", "prefix_projection", "prefix_hidden_size", "embedding_dim")
    return {**expected, **{key: saved[key] for key in kept}}


def _read_json(path: str, flag: str) -> dict:
    return read_json(path, flag, f"{flag}: {path} is missing (not a glmtune P-Tuning checkpoint?)")


# ----------------------------------------------------------------------------- the ancestors' file
# ChatGLM-6B / ChatGLM2-6B ``ptuning/`` save a ``pytorch_model.bin`` holding only the trainable
# ``transformer.prefix_encoder.*`` tensors (``embedding.weight``, and ``trans.0/2.*`` with
# ``prefix_projection``) and load it into a base built with the same ``pre_seq_len``. PrefixEncoder has the
# same parameter names and the same flat layout (layer, key/value, kv head, head_dim), so converting is
# renaming: their checkpoints load here unchanged, and glmtune writes that file too for ChatGLM bases
# (unless --prefix_hidden_size differs from hidden_size: their projection has no other width).

ORIGINAL_WEIGHTS = "pytorch_model.bin"
ORIGINAL_KEY_PREFIX = "transformer.prefix_encoder."


def _is_original_format(checkpoint: str) -> bool:
    """An ancestors' checkpoint: their pytorch_model.bin and none of glmtune's files."""
    return (
        not os.path.isfile(os.path.join(checkpoint, CONFIG_FILE))
        and os.path.isfile(os.path.join(checkpoint, ORIGINAL_WEIGHTS))
        and not os.path.isfile(os.path.join(checkpoint, "adapter_config.json"))
    )


def read_original_prefix(checkpoint: str) -> dict:
    """The prefix tensors of an ancestors' checkpoint, under PrefixEncoder's names."""
    path = os.path.join(checkpoint, ORIGINAL_WEIGHTS)
    try:  # weights_only: a checkpoint from elsewhere must not run code when loaded
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated zip, pickle with code in it, not a torch file at all
        raise GlmtuneError(f"{path} is not a readable weights file: {error}") from None
    prefix = ORIGINAL_KEY_PREFIX
    weights = {key[len(prefix) :]: value for key, value in state.items() if key.startswith(prefix)}
    if "embedding.weight" not in weights:
        raise GlmtuneError(f"{path} holds no {prefix}embedding.weight: not a P-Tuning v2 checkpoint")
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


def original_cannot_load(config: dict) -> str | None:
    """Why the ancestors' code could not load this prefix (None when it can). Their projection is always
    ``hidden_size`` wide (ChatGLM-6B hidden -> hidden -> kv, ChatGLM2/3 kv -> hidden -> kv): a prefix projected
    through another width fails there with a size mismatch on ``trans.*``."""
    if config["prefix_projection"] and config["prefix_hidden_size"] != config["hidden_size"]:
        return (
            f"the original ChatGLM code projects the prefix through hidden_size {config['hidden_size']} and cannot "
            f"load one trained with --prefix_hidden_size {config['prefix_hidden_size']} (glmtune's own files load it)"
        )
    return None


def save_original_prefix(weights: dict, output_dir: str) -> None:
    """``weights``: the PrefixEncoder's state dict (CPU tensors)."""
    state = {ORIGINAL_KEY_PREFIX + name: tensor for name, tensor in weights.items()}
    torch.save(state, os.path.join(output_dir, ORIGINAL_WEIGHTS))
