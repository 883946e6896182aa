"""What a training run is, so that no run continues, reports on or overwrites another run's results silently.

* A run's identity (:func:`identity`): the method, the base, the settings that shape the trained weights and
  the effective batch. The trainer writes it as ``run.json`` into the output folder and every checkpoint.
* Resuming (``--resume_from_checkpoint``) checks that the checkpoint belongs to this run (same identity) and
  that it has steps left; a finished run says so and changes nothing (:class:`RunFinished`).
* A new run in a folder holding another run's files refuses, or with ``--overwrite_output_dir`` moves them aside
  to ``<folder>.previous-<time>`` just before training starts (:func:`move_previous_run_aside`).

Everything here but the move reads files only, so it runs before the base model is loaded.
"""

import hashlib
import json
import logging
import os
import time

from transformers.trainer_utils import get_last_checkpoint

from glmtune.errors import GlmtuneError
from glmtune.files import read_json

logger = logging.getLogger(__name__)

IDENTITY_FILE = "run.json"
TRAINER_STATE = "trainer_state.json"
# LoRA settings that change the trained function beyond rank and targets: in the identity only when set away from
# these defaults, so that the run.json of runs from before them still identifies them.
LORA_OPTIONS = {
    "lora_variant": "lora",
    "use_dora": False,
    "use_rslora": False,
    "init_lora_weights": "true",
    "adalora_init_rank": None,
}


class RunFinished(GlmtuneError):
    """Resuming a run that has no steps left: nothing to do (the CLI says so and exits 0)."""


def identity(config) -> dict:
    """The run's identity; two checkpoints of one run have equal identities."""
    training = config.training
    if config.method == "ptuning":
        shape = {k: getattr(config.ptuning, k) for k in ("pre_seq_len", "prefix_projection", "prefix_hidden_size")}
    elif config.method == "lora":
        shape = {"lora_rank": config.lora.lora_rank, "lora_target": config.lora.lora_target}
        if config.lora.modules_to_save:  # only when given: runs from before the flag keep their identity
            shape["modules_to_save"] = config.lora.modules_to_save
        shape.update({k: getattr(config.lora, k) for k, v in LORA_OPTIONS.items() if getattr(config.lora, k) != v})
    else:
        shape = {"trainable_layers": config.finetune.trainable_layers or "all"}
    return {
        "method": config.method,
        "base": _config_digest(config.model.model_name_or_path),
        "trained_weights": shape,
        "effective_batch": training.per_device_train_batch_size
        * training.gradient_accumulation_steps
        * max(1, training.world_size),
    }


def _config_digest(model_dir: str) -> str:
    """The base model's config.json, hashed: the same base wherever its folder is."""
    with open(os.path.join(model_dir, "config.json"), "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:16]


def write_identity(run: dict, folder: str) -> None:
    with open(os.path.join(folder, IDENTITY_FILE), "w", encoding="utf-8") as f:
        json.dump(run, f, indent=2)


def resume_checkpoint(config) -> str | None:
    """The checkpoint folder --resume_from_checkpoint names ('last': the newest checkpoint-N of --output_dir),
    checked to belong to this run and to have steps left. Raises RunFinished when it has none."""
    training = config.training
    resume = training.resume_from_checkpoint
    if resume is None or not training.do_train:
        return None
    flag = f"--resume_from_checkpoint {resume}"
    if str(resume).lower() in ("last", "true"):
        last = get_last_checkpoint(training.output_dir) if os.path.isdir(training.output_dir) else None
        if last is None:
            raise GlmtuneError(f"{flag}: no checkpoint-N folder in {training.output_dir}")
        resume, flag = last, f"{flag} ({last})"
    state = _read_json(os.path.join(resume, TRAINER_STATE), flag, "not a training checkpoint")
    _check_same_run(config, resume, flag)
    step, max_steps = state.get("global_step", 0), training.max_steps
    if max_steps > 0 and step >= max_steps:
        raise RunFinished(
            f"{flag}: this run already finished (global step {step} of --max_steps {max_steps}): nothing to do. "
            "Raise --max_steps to train it further."
        )
    return resume


def _check_same_run(config, checkpoint: str, flag: str) -> None:
    path = os.path.join(checkpoint, IDENTITY_FILE)
    if not os.path.isfile(path):  # written by glmtune before run.json existed: the method is in its files
        theirs = _method_of(checkpoint)
        if theirs != config.method:
            raise GlmtuneError(f"{flag} belongs to another run: method {theirs} there, {config.method} here")
        return
    saved, current = _read_json(path, flag, "corrupt"), identity(config)
    differences = [
        f"{key} {_short(saved.get(key))} there, {_short(current[key])} here"
        for key in current
        if saved.get(key) != current[key]
    ]
    if differences:
        raise GlmtuneError(
            f"{flag} belongs to another run ({'; '.join(differences)}): resume with the same settings, or start a "
            "new run in a new --output_dir"
        )


def _method_of(checkpoint: str) -> str:
    has = lambda name: os.path.isfile(os.path.join(checkpoint, name))  # noqa: E731
    if has("prefix_config.json"):
        return "ptuning"
    return "lora" if has("adapter_config.json") else "finetune"


def _short(value) -> str:
    return json.dumps(value, sort_keys=True) if isinstance(value, dict) else str(value)


def _read_json(path: str, flag: str, what: str) -> dict:
    return read_json(path, flag, f"{flag}: no {os.path.basename(path)} in it ({what})")


def previous_run_problems(config) -> list[str]:
    """A new training run needs an empty --output_dir, unless --overwrite_output_dir moves the old files aside."""
    training = config.training
    if not training.do_train or training.resume_from_checkpoint or config.run.overwrite_output_dir:
        return []
    if _previous_run_files(training.output_dir):
        return [
            f"--output_dir {training.output_dir} holds another run's files: add --overwrite_output_dir to move them "
            "aside (to a .previous-<time> folder beside it), --resume_from_checkpoint last to continue that run, "
            "or pick a new folder"
        ]
    return []


def _previous_run_files(output_dir: str) -> list:
    return sorted(os.listdir(output_dir)) if os.path.isdir(output_dir) else []


def move_previous_run_aside(config) -> str | None:
    """--overwrite_output_dir on a new run: the folder's files move to ``<folder>.previous-<time>``; its path."""
    training = config.training
    if not training.do_train or training.resume_from_checkpoint or not training.should_save:
        return None
    if not _previous_run_files(training.output_dir):
        return None
    folder = training.output_dir.rstrip("/\\")
    aside = f"{folder}.previous-{time.strftime('%Y%m%d-%H%M%S')}"
    while os.path.exists(aside):
        aside += "x"
    os.replace(folder, aside)
    os.makedirs(folder)
    logger.warning("%s held another run's files: moved them to %s", folder, aside)
    return aside
