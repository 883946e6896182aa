"""The ``adapter_config.json`` glmtune writes beside a LoRA adapter: one that PEFT 0.6 to today all load.

PEFT 0.6-0.13 build ``LoraConfig(**json)`` and fail on a key they do not know (``TypeError: unexpected keyword
argument 'alora_invocation_tokens'`` for a config written by PEFT 0.21); 0.14 and later drop unknown keys with a
warning. So the config keeps the 18 keys every version knows, and of the others only those set away from PEFT's
default: a key that changes what the weights mean (``use_dora``, ``use_rslora``, ``layer_replication``, ...) then
makes an old PEFT fail loudly instead of loading a different adapter. Also:

* ``target_modules`` is the explicit sorted list of the adapted modules' names (``"all-linear"`` is 0.8+);
* ``init_lora_weights`` is ``true`` when the saved weights are plain LoRA whatever their initial values were
  (a PiSSA / OLoRA / LoftQ value would make new PEFT run that initialisation again at load), and the settings of
  those initialisations go with it;
* ``peft_version`` (0.18+) is dropped: it records who wrote the file, and 0.6-0.13 fail on it.

Every version reads ``adapter_model.safetensors`` (PEFT 0.6.2 loads 0.21's file exactly).
"""

import dataclasses
import json
import os
import re

from safetensors import safe_open

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
# The keys of PEFT 0.6.0's LoraConfig (with PeftConfig's), which every later version keeps.
PORTABLE_KEYS = frozenset(
    {
        "r",
        "lora_alpha",
        "lora_dropout",
        "target_modules",
        "fan_in_fan_out",
        "bias",
        "modules_to_save",
        "init_lora_weights",
        "layers_to_transform",
        "layers_pattern",
        "rank_pattern",
        "alpha_pattern",
        "peft_type",
        "auto_mapping",
        "base_model_name_or_path",
        "revision",
        "task_type",
        "inference_mode",
    }
)
WRITER_KEYS = frozenset({"peft_version"})
# Initialisations after which the trained A and B are plain LoRA over an unchanged base.
PLAIN_INITS = (True, False, "gaussian", "orthogonal", "eva")
INIT_SETTINGS = frozenset({"loftq_config", "eva_config", "corda_config", "lora_ga_config"})
_ADAPTED = re.compile(r"(?:^|\.)([^.]+)\.lora_(?:embedding_)?A(?:\.|$)")


def portable(config: dict, adapted: list[str]) -> dict:
    """``config`` (as PEFT wrote it) reduced to what every PEFT version loads; ``adapted``: the names of the
    modules that carry LoRA weights (:func:`adapted_modules`)."""
    defaults = peft_defaults()
    plain = _is_plain_init(config.get("init_lora_weights", True))
    kept = {}
    for key, value in config.items():
        if key in WRITER_KEYS or (plain and key in INIT_SETTINGS):
            continue
        if key in PORTABLE_KEYS or key not in defaults or value != defaults[key]:
            kept[key] = value
    if adapted:
        kept["target_modules"] = sorted(set(adapted))
    if plain:
        kept["init_lora_weights"] = True
    return kept


def _is_plain_init(value) -> bool:
    return any(value is plain if isinstance(plain, bool) else value == plain for plain in PLAIN_INITS)


def peft_defaults() -> dict:
    """LoraConfig's fields and their defaults, in the installed PEFT."""
    from peft import LoraConfig

    defaults = {}
    for field in dataclasses.fields(LoraConfig):
        has_factory = field.default_factory is not dataclasses.MISSING
        defaults[field.name] = field.default_factory() if has_factory else field.default
    return defaults


def adapted_modules(weights_file: str) -> list[str]:
    """The last name of every module holding LoRA weights in an ``adapter_model.safetensors``, sorted."""
    with safe_open(weights_file, framework="pt") as f:
        return sorted({match.group(1) for key in f.keys() if (match := _ADAPTED.search(key))})


def make_portable(folder: str) -> None:
    """Rewrite the ``adapter_config.json`` PEFT saved in ``folder`` as :func:`portable` says."""
    path = os.path.join(folder, CONFIG_FILE)
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    config = portable(config, adapted_modules(os.path.join(folder, WEIGHTS_FILE)))
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(path + ".tmp", path)
