"""LoRA through PEFT on a frozen (optionally 4/8-bit) base.

* **What is added**: PEFT's LoRA layers on every linear layer of the decoder (or ``--lora_target``).
* **What trains**: the LoRA matrices only (PEFT keeps them float32).
* **What is saved**: a standard PEFT adapter folder, ``adapter_model.safetensors`` + ``adapter_config.json``,
  which ``PeftModel.from_pretrained`` loads, PEFT 0.6 and later (:mod:`glmtune.adapter_config`).
* **Merging**: :func:`merge_and_save` folds an adapter into its base and saves a plain model folder.
"""

import inspect
import logging
import os
import shutil

import torch
from safetensors import SafetensorError

from glmtune import chatglm
from glmtune.adapter_config import CONFIG_FILE, WEIGHTS_FILE
from glmtune.arguments import LoraArguments
from glmtune.errors import GlmtuneError

logger = logging.getLogger(__name__)

# The original LoRA recipes' targets on the original ChatGLM models (ChatGLM-Tuning, ChatGLM3 finetune_demo,
# PromptCBLUE): every linear layer of the decoder, by their original names.
CHATGLM_TARGETS = ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]


def add_lora(model, args: LoraArguments):
    """Wrap the frozen base with LoRA adapters (new ones, or --lora_checkpoint's)."""
    model.requires_grad_(False)
    if args.lora_checkpoint:
        return load_adapter(model, args.lora_checkpoint)
    from peft import LoraConfig, get_peft_model

    targets = lora_targets(args.lora_target, model.config)
    _check_targets(model, targets, args.lora_target)
    config = LoraConfig(
        task_type="CAUSAL_LM",
        r=args.lora_rank,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=targets,
    )
    try:
        return get_peft_model(model, config)
    except ValueError as error:
        raise GlmtuneError(f"--lora_target {args.lora_target}: {error}") from None


def load_adapter(model, folder: str, trainable: bool = False):
    """The base wrapped with the adapter saved in ``folder`` (PEFT format)."""
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(model, folder, is_trainable=trainable)
    except SafetensorError as error:  # a truncated or corrupt weights file
        raise GlmtuneError(f"--lora_checkpoint: {os.path.join(folder, WEIGHTS_FILE)} is corrupt: {error}") from None
    except (ValueError, OSError, RuntimeError) as error:
        raise GlmtuneError(f"--lora_checkpoint {folder}: cannot load this adapter: {error}") from None


def lora_targets(spec: str, model_config=None):
    """'all' -> every linear layer except the output head (PEFT's 'all-linear'; for the original ChatGLM
    models their four linear layers by name, as their LoRA recipes write it); else a list of names."""
    if spec.strip() == "all":
        return list(CHATGLM_TARGETS) if chatglm.is_chatglm_config(model_config) else "all-linear"
    return [name.strip() for name in spec.split(",") if name.strip()]


def check_targets_early(model_args, spec: str) -> None:
    """--lora_target checked on the base's shape alone (an empty copy on the meta device: no weights read), so
    that a typo stops the run before the data is tokenized and the base loaded."""
    from glmtune.model import empty_model

    model = empty_model(model_args)
    if model is not None:
        _check_targets(model, lora_targets(spec, model.config), spec)


def _check_targets(model, targets, spec: str) -> None:
    """Every name given must adapt something: PEFT refuses only when none matches, and drops the others silently."""
    if isinstance(targets, str):  # "all-linear": PEFT's own rule
        return
    names = [name for name, _ in model.named_modules()]
    missing = [t for t in targets if not any(name == t or name.endswith("." + t) for name in names)]
    if missing:
        linear = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if _is_linear(m)} - {""})
        raise GlmtuneError(
            f"--lora_target {spec}: no module named {', '.join(missing)} in this model; its linear layers: "
            f"{', '.join(linear)} (or all)"
        )


def _is_linear(module) -> bool:
    return isinstance(module, torch.nn.Linear) or type(module).__name__ in ("Linear8bitLt", "Linear4bit")


def is_checkpoint(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, CONFIG_FILE))


# ----------------------------------------------------------------------------- merging


def merge_and_save(model, tokenizer, output: str, max_shard_size: str) -> None:
    """Fold the adapter of ``model`` (a PeftModel) into its base and save a plain model folder at ``output``.

    Written to ``output.partial`` and renamed when complete, so ``output`` is never a half-written folder.
    """
    merged = model.merge_and_unload()
    merged.config.use_cache = True  # the loader turns it off for training; a saved model should generate normally
    partial = output.rstrip("/\\") + ".partial"
    if os.path.exists(partial):
        shutil.rmtree(partial)  # left over by an interrupted merge
    save_kwargs = {"max_shard_size": max_shard_size}
    if "safe_serialization" in inspect.signature(merged.save_pretrained).parameters:
        save_kwargs["safe_serialization"] = True  # transformers 4; transformers 5 always writes safetensors
    merged.save_pretrained(partial, **save_kwargs)
    tokenizer.save_pretrained(partial)
    generation_config = getattr(merged, "generation_config", None)
    if generation_config is not None and not os.path.isfile(os.path.join(partial, "generation_config.json")):
        generation_config.save_pretrained(partial)
    if os.path.exists(output):  # the caller checked that replacing it was asked for
        shutil.rmtree(output)
    os.rename(partial, output)
