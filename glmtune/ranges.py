"""The allowed range of every numeric flag, glmtune's and transformers' training ones, checked in one place
before anything is loaded or written (one problem per flag: glmtune.parsing reports them together).

transformers checks few of these itself, and late: a batch size of 0 failed inside the data loader with a
traceback after the output folder was made; a learning rate of nan inside the optimizer; --max_steps 0 and
--save_steps 0 trained on silently.
"""

import math


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def positive_int(value):
    return None if isinstance(value, int) and not isinstance(value, bool) and value > 0 else "a positive integer"


def non_negative_int(value):
    return None if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else "an integer >= 0"


def positive(value):
    return None if _number(value) and value > 0 else "a positive number"


def non_negative(value):
    return None if _number(value) and value >= 0 else "a number >= 0"


def below_one(value):
    return None if _number(value) and 0 <= value < 1 else "in [0, 1)"


def fraction(value):
    return None if _number(value) and 0 <= value <= 1 else "in [0, 1]"


def probability(value):
    return None if _number(value) and 0 < value <= 1 else "in (0, 1]"


def steps(value):
    ok = isinstance(value, int) and not isinstance(value, bool) and (value > 0 or value == -1)
    return None if ok else "a positive number of steps (or -1: as many as --num_train_epochs take)"


def seed(value):
    return None if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**32 else "in [0, 2^32)"


# argument group (a RunConfig attribute) -> flag -> rule; None values are "not set" and pass.
RULES = {
    "data": {
        "max_source_length": positive_int, "max_target_length": positive_int, "val_max_target_length": positive_int,
        "max_train_samples": positive_int, "max_eval_samples": positive_int, "max_predict_samples": positive_int,
        "preprocessing_num_workers": positive_int,
    },
    "ptuning": {"pre_seq_len": positive_int, "prefix_hidden_size": positive_int, "prefix_dropout": below_one},
    "lora": {
        "lora_rank": positive_int, "lora_alpha": positive, "lora_dropout": below_one, "loraplus_lr_ratio": positive,
        "adalora_init_rank": positive_int, "adalora_tinit": non_negative_int, "adalora_tfinal": non_negative_int,
    },
    "finetune": {"trainable_layers": positive_int},
    "generation": {
        "max_new_tokens": positive_int, "num_beams": positive_int, "top_p": probability, "temperature": positive,
        "repetition_penalty": positive,
    },
    "run": {"max_memory_gib": positive},
    "training": {
        "per_device_train_batch_size": positive_int, "per_device_eval_batch_size": positive_int,
        "gradient_accumulation_steps": positive_int, "eval_accumulation_steps": positive_int, "max_steps": steps,
        "num_train_epochs": positive, "learning_rate": non_negative, "weight_decay": non_negative,
        "adam_beta1": below_one, "adam_beta2": below_one, "adam_epsilon": positive, "max_grad_norm": non_negative,
        "warmup_steps": non_negative, "logging_steps": positive, "save_steps": positive, "eval_steps": positive,
        "save_total_limit": positive_int, "seed": seed, "dataloader_num_workers": non_negative_int,
        "label_smoothing_factor": below_one,
    },
}  # fmt: skip


def problems(config) -> list[str]:
    """One line per numeric flag outside its range."""
    found = []
    for group, rules in RULES.items():
        arguments = getattr(config, group)
        for flag, rule in rules.items():
            value = getattr(arguments, flag, None)
            if value is None:
                continue
            expected = rule(value)
            if expected:
                found.append(f"--{flag} must be {expected}, got {value}")
    return found
