"""Full fine-tuning: the base model itself trains, and every checkpoint is a complete model folder.

* **What is added**: nothing: the base's own weights are the trained weights.
* **What trains**: every parameter of the base; with ``--trainable_layers N`` only the last N decoder layers
  (LLaMA-Factory's "freeze" tuning: the embeddings, the earlier layers, the final norm and the output head stay
  frozen, and bit-identical to the base's).
* **What is saved**: a model folder as transformers writes it (:func:`save_model_folder`): safetensors shards of
  at most :data:`MAX_SHARD_SIZE` with their index (one ``model.safetensors`` when it is smaller), ``config.json``,
  ``generation_config.json`` and the tokenizer files. ``AutoModelForCausalLM.from_pretrained`` loads it, and every
  glmtune tool takes it as ``--model_name_or_path``. A ChatGLM base keeps THUDM's format (the original config.json
  fields and state-dict keys, which glmtune's ChatGLM classes read), and the base folder's own code files and
  ``auto_map`` entries are carried over, so that THUDM's code (``trust_remote_code``) finds them as in the base.
* **Precision**: without DeepSpeed the trained weights stay float32 (the saved folder too, so that a resumed run
  continues from exactly the weights it stopped at) and ``--bf16`` computes in bf16 (on by default on GPUs that
  have it: glmtune.parsing); under DeepSpeed the engine keeps float32 master weights and the folder holds its
  16-bit weights, gathered from every process under ZeRO-3.
"""

import json
import os
import shutil

import torch

from glmtune import chatglm
from glmtune.arguments import FinetuneArguments
from glmtune.errors import GlmtuneError
from glmtune.model import base_causal_lm

MAX_SHARD_SIZE = "5GB"  # a 6B model in bf16: 3 shards; the ancestors' merged models used 2 GB, LLaMA-Factory 5 GB
MARKER = "glmtune_full_finetuning"  # set on the model by add_full_finetuning, read when saving


def add_full_finetuning(model, args: FinetuneArguments):
    """Make the base trainable: every weight, or only its last ``args.trainable_layers`` decoder layers."""
    layers = decoder_layers(model)
    if args.trainable_layers is None:
        model.requires_grad_(True)
    else:
        check_trainable_layers(args.trainable_layers, len(layers))
        model.requires_grad_(False)
        for layer in layers[len(layers) - args.trainable_layers :]:
            layer.requires_grad_(True)
    setattr(model, MARKER, True)
    return model


def is_fully_finetuned(model) -> bool:
    return getattr(model, MARKER, False)


def decoder_layers(model) -> list:
    return list(base_causal_lm(model).get_decoder().layers)


def check_trainable_layers(count: int, num_layers: int) -> None:
    if not 1 <= count <= num_layers:
        raise GlmtuneError(
            f"--trainable_layers {count}: the model has {num_layers} decoder layers: give 1 to {num_layers}, "
            "or leave the flag out to train every weight"
        )


def check_layers_early(model_args, count: int | None) -> None:
    """--trainable_layers checked on the base's shape alone (an empty copy: no weights read), before the data."""
    from glmtune.model import empty_model

    model = empty_model(model_args) if count is not None else None
    if model is not None:
        check_trainable_layers(count, len(decoder_layers(model)))


# ----------------------------------------------------------------------------- saving


def save_model_folder(model, output_dir: str, state_dict: dict, tokenizer=None) -> None:
    """``model`` as a complete model folder in ``output_dir``; ``state_dict``: its weights (under DeepSpeed the
    engine's, gathered into the main process)."""
    state_dict = {**state_dict, **_original_buffers(model, state_dict)}
    config = model.config
    use_cache, config.use_cache = config.use_cache, True  # off while training; a saved model generates with it
    try:
        model.save_pretrained(output_dir, state_dict=state_dict, max_shard_size=MAX_SHARD_SIZE)
    finally:
        config.use_cache = use_cache
    if tokenizer is not None:
        tokenizer.save_pretrained(output_dir)
    carry_remote_code(model.name_or_path, output_dir)


def _original_buffers(model, state_dict: dict) -> dict:
    """ChatGLM-6B's checkpoints hold each layer's ``rotary_emb.inv_freq``, which glmtune's class recomputes instead
    of keeping; THUDM's code expects the key (it warns of a newly initialised weight without it)."""
    if not chatglm.is_chatglm_config(model.config) or chatglm.architecture(model.config.to_dict()) != "v1":
        return {}
    dtype = next(iter(state_dict.values())).dtype
    inv_freq = torch.tensor(base_causal_lm(model).get_decoder().inv_freq, dtype=dtype)
    names = (f"transformer.layers.{i}.attention.rotary_emb.inv_freq" for i in range(model.config.num_layers))
    return {name: inv_freq.clone() for name in names}


def carry_remote_code(base_dir: str, output_dir: str) -> None:
    """The base folder's own Python files (THUDM's modeling_chatglm.py, ...) and the ``auto_map`` entries that name
    them, which transformers drops from tokenizer_config.json when it saves: trust_remote_code loaders need both."""
    if not base_dir or not os.path.isdir(base_dir) or os.path.abspath(base_dir) == os.path.abspath(output_dir):
        return
    for name in os.listdir(base_dir):
        if name.endswith(".py"):
            shutil.copy(os.path.join(base_dir, name), os.path.join(output_dir, name))
    for name in ("config.json", "tokenizer_config.json"):
        _keep_auto_map(os.path.join(base_dir, name), os.path.join(output_dir, name))


def _keep_auto_map(base_file: str, saved_file: str) -> None:
    base, saved = _read_json(base_file), _read_json(saved_file)
    if "auto_map" not in base or "auto_map" in saved or not os.path.isfile(saved_file):
        return
    saved["auto_map"] = base["auto_map"]
    with open(saved_file + ".tmp", "w", encoding="utf-8") as f:
        json.dump(saved, f, indent=2, ensure_ascii=False)
    os.replace(saved_file + ".tmp", saved_file)


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}
