"""The two methods side by side: what is added to the frozen base, what trains, what is saved.

* P-Tuning v2: a :class:`~glmtune.prefix.PrefixEncoder` (float32) on ``model.prefix_encoder``; it is the
  only thing that trains; a checkpoint is ``prefix_encoder.safetensors`` + ``prefix_config.json``.
* LoRA: PEFT's LoraConfig on every linear layer of the decoder (or ``--lora_target``); the LoRA
  matrices train (PEFT keeps them float32); a checkpoint is a standard PEFT adapter folder.
"""

import json
import logging
import os

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from glmtune import chatglm
from glmtune.chatglm import prefix_format
from glmtune.arguments import LoraArguments, PtuningArguments
from glmtune.errors import GlmtuneError
from glmtune.prefix import PrefixEncoder, attach_prefix

logger = logging.getLogger(__name__)

PREFIX_WEIGHTS = "prefix_encoder.safetensors"
PREFIX_CONFIG = "prefix_config.json"
# What a prefix must match in the base it is loaded into (checkpoints may predate vocab_size/hidden_size).
PREFIX_SHAPE_KEYS = ("num_layers", "kv_heads", "head_dim", "hidden_size", "vocab_size")


# ----------------------------------------------------------------------------- P-Tuning v2


def prefix_config(model_config, args: PtuningArguments) -> dict:
    hidden_size = model_config.hidden_size
    heads = model_config.num_attention_heads
    num_layers = model_config.num_hidden_layers
    kv_heads = getattr(model_config, "num_key_value_heads", None) or heads
    head_dim = getattr(model_config, "head_dim", None) or hidden_size // heads
    return {
        "pre_seq_len": args.pre_seq_len,
        "prefix_projection": args.prefix_projection,
        "prefix_hidden_size": args.prefix_hidden_size or hidden_size,
        "embedding_dim": chatglm.prefix_embedding_dim(model_config, num_layers * 2 * kv_heads * head_dim),
        "num_layers": num_layers,
        "kv_heads": kv_heads,
        "head_dim": head_dim,
        "hidden_size": hidden_size,
        "vocab_size": model_config.vocab_size,
    }


def add_prefix_encoder(model, args: PtuningArguments):
    """Freeze the base, attach a float32 prefix encoder (loaded from --ptuning_checkpoint if given)."""
    config = prefix_config(model.config, args)
    checkpoint, original_weights = args.ptuning_checkpoint, None
    if checkpoint and _is_original_format(checkpoint):  # read once: its shapes are its only config
        original_weights = prefix_format.read_original_prefix(checkpoint)
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
        load_prefix_weights(model, checkpoint, original_weights)
    allow_trainer_on_quantized(model)
    log_trainable(model)
    return model


def allow_trainer_on_quantized(model) -> None:
    """The Trainer refuses a quantized base that carries no PEFT adapter; ours carries a prefix encoder
    (or nothing, when the base alone is evaluated), which is just as safe."""
    if getattr(model, "is_quantized", False):
        model._hf_peft_config_loaded = True


def _checked_checkpoint_config(checkpoint: str, expected: dict, args: PtuningArguments, original_weights=None) -> dict:
    """The checkpoint's prefix config, after checking it fits this base and the flags given
    (``original_weights``: an ancestors' checkpoint's tensors, None for glmtune's own format)."""
    if original_weights is not None:
        saved = prefix_format.original_prefix_config(original_weights, checkpoint, expected)
    else:
        saved = read_json(os.path.join(checkpoint, PREFIX_CONFIG), "--ptuning_checkpoint")
    mismatched = [key for key in PREFIX_SHAPE_KEYS if key in saved and saved[key] != expected[key]]
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
    return {
        **expected,
        **{key: saved[key] for key in ("pre_seq_len", "prefix_projection", "prefix_hidden_size", "embedding_dim")},
    }


def read_json(path: str, flag: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise GlmtuneError(f"{flag}: {path} is missing (not a glmtune P-Tuning checkpoint?)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise GlmtuneError(f"{flag}: {path} is corrupt: {error}") from None


def is_prefix_checkpoint(folder: str) -> bool:
    """A P-Tuning v2 checkpoint, glmtune's or the ancestors'."""
    return os.path.isfile(os.path.join(folder, PREFIX_CONFIG)) or _is_original_format(folder)


def _is_original_format(checkpoint: str) -> bool:
    """An ancestors' checkpoint: their pytorch_model.bin and none of glmtune's files."""
    return (
        not os.path.isfile(os.path.join(checkpoint, PREFIX_CONFIG))
        and prefix_format.has_original_prefix(checkpoint)
        and not os.path.isfile(os.path.join(checkpoint, "adapter_config.json"))
    )


def save_prefix_checkpoint(model, output_dir: str) -> None:
    os.makedirs(output_dir, exist_ok=True)
    encoder = model.prefix_encoder
    weights = {name: tensor.detach().contiguous().cpu() for name, tensor in encoder.state_dict().items()}
    save_file(weights, os.path.join(output_dir, PREFIX_WEIGHTS), metadata={"format": "pt"})
    if chatglm.is_chatglm_config(model.config):  # also readable by the ancestors' own ptuning code
        prefix_format.save_original_prefix(weights, output_dir)
    with open(os.path.join(output_dir, PREFIX_CONFIG), "w", encoding="utf-8") as f:
        json.dump(encoder.glmtune_config, f, indent=2)


def load_prefix_weights(model, checkpoint: str, original_weights=None) -> None:
    """``original_weights``: an ancestors' checkpoint's tensors when already read (else read here)."""
    path = os.path.join(checkpoint, PREFIX_WEIGHTS)
    if original_weights is not None or _is_original_format(checkpoint):
        path = os.path.join(checkpoint, prefix_format.ORIGINAL_WEIGHTS)
        weights = original_weights if original_weights is not None else prefix_format.read_original_prefix(checkpoint)
    else:
        weights = _read_prefix_weights(checkpoint, path)
    try:
        model.prefix_encoder.load_state_dict(weights, strict=True)
    except RuntimeError as error:
        raise GlmtuneError(f"{path} does not fit this prefix encoder: {error}") from None


def _read_prefix_weights(checkpoint: str, path: str) -> dict:
    try:
        return load_file(path)
    except FileNotFoundError:
        raise GlmtuneError(f"{checkpoint}: no {PREFIX_WEIGHTS} in it") from None
    except Exception as error:  # safetensors raises its own error types for truncated files
        raise GlmtuneError(f"{path} is corrupt: {error}") from None


# ----------------------------------------------------------------------------- LoRA


def add_lora(model, args: LoraArguments):
    """Wrap the frozen base with LoRA adapters (new ones, or --lora_checkpoint's)."""
    from peft import LoraConfig, PeftModel, get_peft_model

    model.requires_grad_(False)
    if args.lora_checkpoint:
        try:
            model = PeftModel.from_pretrained(model, args.lora_checkpoint, is_trainable=False)
        except SafetensorError as error:  # a truncated or corrupt weights file
            path = os.path.join(args.lora_checkpoint, "adapter_model.safetensors")
            raise GlmtuneError(f"--lora_checkpoint: {path} is corrupt: {error}") from None
        except (ValueError, OSError, RuntimeError) as error:
            raise GlmtuneError(f"--lora_checkpoint {args.lora_checkpoint}: cannot load this adapter: {error}") from None
    else:
        config = LoraConfig(
            task_type="CAUSAL_LM",
            r=args.lora_rank,
            lora_alpha=args.lora_alpha,
            lora_dropout=args.lora_dropout,
            target_modules=lora_targets(args.lora_target, model.config),
        )
        try:
            model = get_peft_model(model, config)
        except ValueError as error:
            raise GlmtuneError(f"--lora_target {args.lora_target}: {error}") from None
    log_trainable(model)
    return model


def lora_targets(spec: str, model_config=None):
    """'all' -> every linear layer except the output head (PEFT's 'all-linear'; for the original ChatGLM
    models their four linear layers by name, as their LoRA recipes write it); else a list of names."""
    if spec.strip() == "all":
        return list(chatglm.LORA_TARGETS) if chatglm.is_chatglm_config(model_config) else "all-linear"
    return [name.strip() for name in spec.split(",") if name.strip()]


# ----------------------------------------------------------------------------- both


def is_prefix_tuned(model) -> bool:
    return hasattr(model, "prefix_encoder")


def trainable_state_dict(model) -> dict:
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


def log_trainable(model) -> None:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    logger.info("Trainable parameters: %s of %s (%.4f%%)", f"{trainable:,}", f"{total:,}", 100 * trainable / total)
