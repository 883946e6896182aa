"""The settings of the weights a run trains or loads: its flags, over a checkpoint's own config (a LoRA adapter's
``adapter_config.json``, a P-Tuning v2 ``prefix_config.json``), over the defaults.

Read before anything loads (JSON files only), so that a flag contradicting a checkpoint, or LoRA options that
cannot run together, stop the run with one line each (glmtune.parsing reports them with the other problems).
The settings filled in here are also the run's identity (glmtune.runs): a warm start has its checkpoint's shape.
"""

import os
from dataclasses import fields

from glmtune.arguments import LORA_DEFAULTS, LORA_INITS, LORA_VARIANTS, LoraArguments
from glmtune.errors import GlmtuneError
from glmtune.files import read_json

LORA_CONFIG = "adapter_config.json"
PREFIX_CONFIG = "prefix_config.json"
# flag -> adapter_config.json key (AdaLoRA's rank is its target_r; its own keys follow)
LORA_KEYS = {
    "lora_rank": "r",
    "lora_alpha": "lora_alpha",
    "lora_dropout": "lora_dropout",
    "use_dora": "use_dora",
    "use_rslora": "use_rslora",
    "init_lora_weights": "init_lora_weights",
}
ADALORA_KEYS = {
    **LORA_KEYS,
    "lora_rank": "target_r",
    "adalora_init_rank": "init_r",
    "adalora_tinit": "tinit",
    "adalora_tfinal": "tfinal",
}
# Flags that must agree with a checkpoint: they fix its weights' shape or what they compute. Not compared: dropout
# (a training setting: the flag's value trains), the targets (compared on the base's modules, glmtune.lora) and
# the initialization (the checkpoint's weights are the start).
MUST_AGREE = ("lora_variant", "lora_rank", "lora_alpha", "use_dora", "use_rslora", "adalora_init_rank")
ADALORA_ONLY = ("adalora_init_rank", "adalora_tinit", "adalora_tfinal")
CHANGES_BASE = ("pissa", "olora")  # inits that move part of each weight into the adapter
PREFIX_SHAPE = ("pre_seq_len", "prefix_projection", "prefix_hidden_size")


def read_config(folder: str, name: str, flag: str) -> dict:
    return read_json(os.path.join(folder, name), f"--{flag}", f"--{flag} {folder}: no {name} in it")


# ----------------------------------------------------------------------------- LoRA


def given_lora_flags(args: LoraArguments, names=frozenset()) -> dict:
    """The LoRA flags set: away from their defaults, or named in the input (``names``: RunConfig.given)."""
    values = {f.name: (getattr(args, f.name), f.default) for f in fields(args)}
    return {name: value for name, (value, default) in values.items() if value != default or name in names}


def saved_lora_settings(saved: dict) -> dict:
    """A checkpoint's adapter_config.json as glmtune's flags."""
    adalora = saved.get("peft_type") == "ADALORA"
    settings = {flag: saved.get(key) for flag, key in (ADALORA_KEYS if adalora else LORA_KEYS).items()}
    settings.update(
        lora_variant="adalora" if adalora else "lora",
        lora_target=target_names(saved.get("target_modules")),
        use_dora=bool(settings["use_dora"]),
        use_rslora=bool(settings["use_rslora"]),
        init_lora_weights=str(settings["init_lora_weights"]).lower(),
    )
    return {flag: value for flag, value in settings.items() if value is not None}


def target_names(target_modules) -> str | None:
    """PEFT's target_modules (module paths, or names, or a regular expression) as --lora_target names."""
    if target_modules is None or isinstance(target_modules, str):
        return target_modules
    return ",".join(sorted({name.rsplit(".", 1)[-1] for name in target_modules}))


def saved_lora_targets(folder: str) -> str | None:
    """--lora_checkpoint's targets as --lora_target names (its config was read once already, while parsing)."""
    return target_names(read_config(folder, LORA_CONFIG, "lora_checkpoint").get("target_modules"))


def lora_settings(args: LoraArguments, names=frozenset()) -> tuple[dict, list[str]]:
    """The run's LoRA settings (its flags over --lora_checkpoint's over the defaults) and the problems found:
    a checkpoint that cannot be read, flags that contradict it. ``names``: the flags named in the input."""
    given, saved, problems = given_lora_flags(args, names), {}, []
    # a missing folder, or one without an adapter: glmtune.parsing says so
    if args.lora_checkpoint and os.path.isfile(os.path.join(args.lora_checkpoint, LORA_CONFIG)):
        try:
            saved = saved_lora_settings(read_config(args.lora_checkpoint, LORA_CONFIG, "lora_checkpoint"))
        except GlmtuneError as error:
            problems.append(str(error))
        problems += _contradictions(given, saved, args.lora_checkpoint)
    settings = {**LORA_DEFAULTS, **saved, **given}
    if settings["lora_variant"] == "adalora" and settings.get("adalora_init_rank") is None:
        settings["adalora_init_rank"] = max(settings["lora_rank"], settings["lora_rank"] * 3 // 2)  # PEFT's 12 for 8
    return settings, problems


def _contradictions(given: dict, saved: dict, folder: str) -> list[str]:
    keys = {"lora_variant": "peft_type", **(ADALORA_KEYS if saved.get("lora_variant") == "adalora" else LORA_KEYS)}
    return [
        f"--{flag} {given[flag]} contradicts --lora_checkpoint {folder} ({keys[flag]} "
        f"{_shown(flag, saved[flag])} in its {LORA_CONFIG}): give the checkpoint's value or leave the flag out"
        for flag in MUST_AGREE
        if flag in given and flag in saved and given[flag] != saved[flag]
    ]


def _shown(flag: str, value) -> str:
    return value.upper() if flag == "lora_variant" else str(value)


def lora_problems(settings: dict, config) -> list[str]:
    """LoRA options that PEFT or glmtune cannot run together (``config``: glmtune.parsing.RunConfig), one line each."""
    given = given_lora_flags(config.lora, config.given)
    problems = _choice_problems(given) or _warm_start_problems(settings, config)
    if problems:
        return problems
    if settings["lora_variant"] == "adalora":
        problems += _adalora_problems(settings, config)
    else:
        problems += [f"--{flag} applies to --lora_variant adalora only" for flag in ADALORA_ONLY if flag in given]
    return problems + _init_problems(settings, given, config) + _loraplus_problems(settings, config)


def _choice_problems(given: dict) -> list[str]:
    """The names given (a checkpoint's are taken as PEFT wrote them)."""
    choices = {"lora_variant": LORA_VARIANTS, "init_lora_weights": LORA_INITS}
    return [
        f"--{flag} must be one of {', '.join(names)}, got {given[flag]!r}"
        for flag, names in choices.items()
        if flag in given and given[flag] not in names
    ]


def _adalora_problems(settings: dict, config) -> list[str]:
    problems = []
    unsupported = {
        "use_dora": "PEFT's AdaLoRA has no DoRA form",
        "use_rslora": "AdaLoRA scales by its own rank budget",
        "loraplus_lr_ratio": "LoRA+ sets the learning rate of LoRA's B matrices; AdaLoRA's adapters are in SVD form",
    }
    for flag, why in unsupported.items():
        if settings.get(flag):
            problems.append(f"--{flag} cannot be combined with --lora_variant adalora: {why}")
    if settings["init_lora_weights"] != "true":
        problems.append(f"--init_lora_weights {settings['init_lora_weights']} applies to --lora_variant lora only")
    if settings["adalora_init_rank"] < settings["lora_rank"]:
        problems.append(
            f"--adalora_init_rank {settings['adalora_init_rank']} must be at least --lora_rank {settings['lora_rank']} "
            "(AdaLoRA prunes ranks from the first to the second)"
        )
    if config.training.do_train:
        problems += _adalora_training_problems(settings, config)
    return problems


def _adalora_training_problems(settings: dict, config) -> list[str]:
    training, problems = config.training, []
    if training.max_steps <= 0:
        problems.append("--lora_variant adalora needs --max_steps: AdaLoRA schedules its rank budget over the steps")
    elif settings["adalora_tinit"] + settings["adalora_tfinal"] >= training.max_steps:
        problems.append(
            f"--adalora_tinit {settings['adalora_tinit']} + --adalora_tfinal {settings['adalora_tfinal']} leave no "
            f"step of --max_steps {training.max_steps} to reallocate ranks in"
        )
    if "target_token_loss" in config.given and config.run.target_token_loss:
        problems.append(
            "--target_token_loss cannot be combined with --lora_variant adalora: AdaLoRA's orthogonality penalty is "
            "added to the loss PEFT computes from labels (AdaLoRA trains with it; drop the flag)"
        )
    if training.deepspeed:
        problems.append("--lora_variant adalora cannot run under --deepspeed: its rank allocator reads each gradient")
    if training.resume_from_checkpoint is not None:
        problems.append(
            "--resume_from_checkpoint cannot continue an AdaLoRA run: PEFT keeps its rank allocator's importance "
            "scores in memory only, so a resumed run would reallocate from scratch"
        )
    return problems


def _init_problems(settings: dict, given: dict, config) -> list[str]:
    init, bits = settings["init_lora_weights"], config.model.quantization_bit
    if "init_lora_weights" in given and config.lora.lora_checkpoint:
        return [f"--init_lora_weights {init}: --lora_checkpoint's weights are the start; drop the flag"]
    problems = []
    if init in CHANGES_BASE and bits:
        problems.append(
            f"--init_lora_weights {init} moves part of each base weight into the adapter, which a {bits}-bit base "
            "cannot take exactly: drop --quantization_bit"
        )
    if init in CHANGES_BASE and _zero3(config.training):
        problems.append(f"--init_lora_weights {init} decomposes whole weights, which DeepSpeed ZeRO-3 partitions")
    if init == "loftq" and bits != 4:
        problems.append(
            "--init_lora_weights loftq makes up for the quantization error of a 4-bit base: add --quantization_bit 4"
            + (" (PEFT's LoftQ supports 4-bit bases only)" if bits else "")
        )
    if init in (*CHANGES_BASE, "loftq") and settings["use_dora"]:
        why = "is saved converted to a plain LoRA" if init in CHANGES_BASE else "is set after DoRA's magnitude"
        problems.append(f"--use_dora cannot be combined with --init_lora_weights {init}: the adapter {why}")
    return problems


def _warm_start_problems(settings: dict, config) -> list[str]:
    if config.training.do_train and config.lora.lora_checkpoint and settings["lora_variant"] == "adalora":
        return [
            f"--lora_checkpoint {config.lora.lora_checkpoint} is an AdaLoRA adapter, whose ranks were allocated by "
            "the run that trained it: it cannot be trained further (evaluate or merge it, or train a new one)"
        ]
    return []


def _loraplus_problems(settings: dict, config) -> list[str]:
    training = config.training
    if settings.get("loraplus_lr_ratio") and training.deepspeed and "optimizer" in _deepspeed_config(training):
        return ["--loraplus_lr_ratio needs Trainer's optimizer: remove the optimizer from the --deepspeed config"]
    return []


def _zero3(training) -> bool:
    return bool(training.deepspeed) and _deepspeed_config(training).get("zero_optimization", {}).get("stage") == 3


def _deepspeed_config(training) -> dict:
    return training.hf_deepspeed_config.config


# ----------------------------------------------------------------------------- P-Tuning v2


def prefix_settings(config) -> tuple[dict, list[str]]:
    """The prefix's shape flags (given over --ptuning_checkpoint's prefix_config.json) and the problems found.
    An ancestors' checkpoint (pytorch_model.bin alone) has no config: its shapes are checked when it loads."""
    args, problems = config.ptuning, []
    given = {flag: getattr(args, flag) for flag in PREFIX_SHAPE if flag in config.given}
    folder = args.ptuning_checkpoint
    if not folder or not os.path.isfile(os.path.join(folder, PREFIX_CONFIG)):
        return {flag: getattr(args, flag) for flag in PREFIX_SHAPE}, problems
    try:
        saved = read_config(folder, PREFIX_CONFIG, "ptuning_checkpoint")
    except GlmtuneError as error:
        return {flag: getattr(args, flag) for flag in PREFIX_SHAPE}, [str(error)]
    saved = {flag: saved[flag] for flag in PREFIX_SHAPE if flag in saved}
    problems += [
        f"--{flag} {value} contradicts --ptuning_checkpoint {folder} ({flag} {saved[flag]} in its {PREFIX_CONFIG}): "
        "give the checkpoint's value or leave the flag out"
        for flag, value in given.items()
        if flag in saved and value is not None and value != saved[flag]
    ]
    return {**{flag: getattr(args, flag) for flag in PREFIX_SHAPE}, **saved, **given}, problems
