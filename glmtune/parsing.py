"""Turn argv (or a .json file / dict) into validated argument dataclasses.

All cross-argument checks live in :func:`check_args`; it gathers every problem and raises once, so a
user fixing a script sees the whole list instead of one error per run.
"""

import json
import os
import sys
import typing
from dataclasses import dataclass, fields

from transformers import HfArgumentParser, Seq2SeqTrainingArguments

from glmtune import ranges, settings
from glmtune.arguments import (
    DATA_FORMATS,
    DTYPES,
    PREDICTION_FIELDS,
    DataArguments,
    FinetuneArguments,
    GenerationArguments,
    LoraArguments,
    ModelArguments,
    PtuningArguments,
    RunArguments,
)
from glmtune.errors import ArgumentsError
from glmtune.prompt import TEMPLATES
from glmtune.runs import previous_run_problems

METHODS = ("ptuning", "lora", "finetune")
DATA_EXTENSIONS = (".json", ".jsonl", ".csv", ".tsv")
ARGUMENT_CLASSES = (
    ModelArguments,
    DataArguments,
    PtuningArguments,
    LoraArguments,
    FinetuneArguments,
    GenerationArguments,
    RunArguments,
    Seq2SeqTrainingArguments,
)


@dataclass
class RunConfig:
    method: str
    model: ModelArguments
    data: DataArguments
    ptuning: PtuningArguments
    lora: LoraArguments
    finetune: FinetuneArguments
    generation: GenerationArguments
    run: RunArguments
    training: Seq2SeqTrainingArguments
    given: frozenset = frozenset()  # the flags named in the input (set by hand), without their dashes


class _Parser(HfArgumentParser):
    """argparse prints its whole usage (hundreds of lines) before a bad value's message: one line instead."""

    def error(self, message):
        raise ArgumentsError([message])


def parse_args(method: str, args=None) -> RunConfig:
    """Parse argv, a single .json path, or a dict; validate; fill method defaults. Touches no environment."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
    parser = _Parser(ARGUMENT_CLASSES)
    args = sys.argv[1:] if args is None else args
    try:
        return _parse(method, parser, args)
    except ArgumentsError:
        # --deepspeed registers its config process-wide while TrainingArguments are built; a refused run
        # must not leave it behind (later models in the same process would load as if under ZeRO-3).
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()
        raise


def _parse(method: str, parser, args) -> RunConfig:
    try:
        if isinstance(args, dict):
            parsed = parser.parse_dict(_prepared(method, args))
        elif len(args) == 1 and args[0].endswith(".json"):
            with open(os.path.abspath(args[0]), encoding="utf-8") as f:
                parsed = parser.parse_dict(_prepared(method, json.load(f)))
        else:
            parsed = parser.parse_args_into_dataclasses(_prepared(method, list(args)))
    except ValueError as error:  # TrainingArguments' own checks, unknown keys in a dict/json
        raise ArgumentsError([_unknown_flags(error)]) from None
    except FileNotFoundError:
        raise ArgumentsError([f"{args[0]}: no such argument file"]) from None
    except json.JSONDecodeError as error:
        raise ArgumentsError([f"{args[0]}:{error.lineno}: invalid JSON ({error.msg})"]) from None
    except ImportError:  # TrainingArguments load DeepSpeed as soon as --deepspeed is given
        raise ArgumentsError(
            ["--deepspeed needs DeepSpeed, which is not installed: pip install -r requirements-deepspeed.txt"]
        ) from None
    config = RunConfig(method, *parsed, given=_given_flags(args))
    type_problems = _type_problems(config)
    if type_problems:  # a .json file or dict is not type-converted like argv; the range checks need numbers
        raise ArgumentsError(type_problems)
    check_args(config)
    _fill_defaults(config)
    return config


def _given_flags(args) -> frozenset:
    """The names of the flags in argv, a dict or a .json file (``--per-device...`` spelled with underscores)."""
    if isinstance(args, dict):
        return frozenset(args)
    if len(args) == 1 and args[0].endswith(".json"):
        with open(os.path.abspath(args[0]), encoding="utf-8") as f:
            return frozenset(json.load(f))
    return frozenset(_flag_names(args))


def check_args(config: RunConfig) -> None:
    problems = (
        _method_problems(config)
        + _settings_problems(config)
        + _range_problems(config)
        + _task_problems(config)
        + _report_to_problems(config)
        + _path_problems(config)
        + _distributed_problems(config)
        + _optimizer_problems(config.training)
    )
    if problems:
        raise ArgumentsError(problems)


def _type_problems(config: RunConfig) -> list[str]:
    problems = []
    for group in (
        config.model,
        config.data,
        config.ptuning,
        config.lora,
        config.finetune,
        config.generation,
        config.run,
    ):
        hints = typing.get_type_hints(type(group))
        for field in fields(group):
            expected = [t for t in typing.get_args(hints[field.name]) or (hints[field.name],) if t is not type(None)]
            value = getattr(group, field.name)
            if value is None or any(_is_instance(value, t) for t in expected):
                continue
            problems.append(f"--{field.name} must be {expected[0].__name__}, got {value!r}")
    return problems


def _is_instance(value, expected: type) -> bool:
    if expected is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, expected)


def _explicit(dataclass_obj, names) -> list[str]:
    """Names of fields set away from their defaults (the other method's flags default to None/False)."""
    defaults = {f.name: f.default for f in fields(dataclass_obj)}
    return [name for name in names if getattr(dataclass_obj, name) != defaults[name]]


def _method_problems(config: RunConfig) -> list[str]:
    """Each method's own flags only on its own entry point, and what each method needs."""
    given = {
        "ptuning": _explicit(
            config.ptuning, ["pre_seq_len", "prefix_projection", "prefix_hidden_size", "ptuning_checkpoint"]
        ),
        "lora": _explicit(config.lora, [f.name for f in fields(LoraArguments)]),
        "finetune": _explicit(config.finetune, [f.name for f in fields(FinetuneArguments)]),
    }
    trains = f"{config.method}/main.py {METHOD_TRAINS[config.method]}"
    problems = [
        f"{_flags(flags)} belong to {METHOD_NAMES[method]}, but {trains}: remove them, or run {method}/main.py"
        for method, flags in given.items()
        if flags and method != config.method
    ]
    training = config.training
    if config.method == "ptuning" and training.do_train:
        if config.ptuning.pre_seq_len is None and not config.ptuning.ptuning_checkpoint:
            problems.append("--pre_seq_len is required to train P-Tuning v2 (the ChatGLM scripts use 128)")
    if config.method == "finetune" and training.do_train:
        problems += _full_finetuning_dtype_problems(config)
    return problems


def _settings_problems(config: RunConfig) -> list[str]:
    """A checkpoint's own config against the flags given; LoRA options that cannot run together."""
    if config.method == "finetune":
        return []
    if config.method == "ptuning":
        return settings.prefix_settings(config)[1]
    lora_settings, problems = settings.lora_settings(config.lora, config.given)
    return problems + settings.lora_problems(lora_settings, config)


def _full_finetuning_dtype_problems(config: RunConfig) -> list[str]:
    """Weights full fine-tuning cannot train well: 4/8-bit ones not at all; float16 ones (no DeepSpeed, which keeps
    its own float32 copy) overflow and round small updates away."""
    if config.model.quantization_bit:
        return [
            f"--quantization_bit {config.model.quantization_bit}: full fine-tuning trains every weight of the base, "
            "and 4/8-bit weights cannot be trained: remove the flag (DeepSpeed with CPU offload or --optim "
            "paged_adamw_8bit make a large model fit), or train LoRA adapters on the quantized base (lora/train.sh)"
        ]
    if config.model.torch_dtype == "float16" and not config.training.deepspeed:
        return [
            "--torch_dtype float16: full fine-tuning would update float16 weights directly, which overflow and lose "
            "small updates: leave it out (float32 weights; --fp16 computes in float16) or use bfloat16"
        ]
    return []


METHOD_NAMES = {"ptuning": "P-Tuning v2", "lora": "LoRA", "finetune": "full fine-tuning"}
METHOD_TRAINS = {
    "ptuning": "trains a P-Tuning v2 prefix",
    "lora": "trains LoRA adapters",
    "finetune": "trains every weight of the base",
}


def _flags(names) -> str:
    return ", ".join(f"--{name}" for name in names)


def _range_problems(config: RunConfig) -> list[str]:
    data, problems = config.data, []
    if config.model.quantization_bit not in (None, 4, 8):
        problems.append(f"--quantization_bit must be 4 or 8, got {config.model.quantization_bit}")
    if config.model.torch_dtype not in DTYPES:
        problems.append(f"--torch_dtype must be one of {', '.join(DTYPES)}, got {config.model.torch_dtype!r}")
    if data.prompt_template not in TEMPLATES:
        problems.append(f"--prompt_template must be one of {', '.join(TEMPLATES)}, got {data.prompt_template!r}")
    if data.prompt_template == "raw" and data.history_column:
        problems.append(
            "--prompt_template raw has no place for history: drop --history_column or pick another template"
        )
    problems += ranges.problems(config)
    problems += _data_format_problems(data)
    if config.generation.cache_implementation not in (None, "static", "dynamic"):
        problems.append(
            f"--cache_implementation must be static or dynamic, got {config.generation.cache_implementation!r}"
        )
    budget = config.run.max_memory_gib
    if budget is not None and not _cuda_available():
        problems.append(f"--max_memory_gib {budget} budgets GPU memory, and no CUDA GPU is visible here: remove it")
    if config.model.quantization_bit in (4, 8) and not _cuda_available():
        problems.append(
            f"--quantization_bit {config.model.quantization_bit} needs a CUDA GPU (bitsandbytes kernels), and none is "
            "visible here: remove the flag to use the full-precision base"
        )
    return problems


def _report_to_problems(config: RunConfig) -> list[str]:
    """A logging integration that is not installed fails when the Trainer is built, after the model loaded."""
    from transformers.integrations import get_available_reporting_integrations

    wanted = [name for name in (config.training.report_to or []) if name not in ("none", "all")]
    missing = [name for name in wanted if name not in get_available_reporting_integrations()]
    if not missing:
        return []
    installed = ", ".join(get_available_reporting_integrations()) or "none"
    return [f"--report_to {', '.join(missing)}: not installed here (installed: {installed}; or --report_to none)"]


def _data_format_problems(data) -> list[str]:
    if data.data_format not in DATA_FORMATS:
        return [f"--data_format must be one of {', '.join(DATA_FORMATS)}, got {data.data_format!r}"]
    if data.data_format not in ("auto", "prompt_response") and data.column_flags():
        return [
            f"{', '.join(data.column_flags())} name fields of --data_format prompt_response; "
            f"{data.data_format} records have fixed fields (data/README.md): drop the flag(s)"
        ]
    return []


def _keep_columns_problems(config: RunConfig) -> list[str]:
    names = config.data.kept_columns()
    if not names:
        return []
    if not config.training.do_predict:
        return ["--keep_columns names fields of --test_file to write with the predictions: add --do_predict"]
    if "" in names:
        return [f"--keep_columns {config.data.keep_columns!r}: a field name is empty"]
    taken = [name for name in names if name in PREDICTION_FIELDS]
    if taken:
        return [
            f"--keep_columns {', '.join(taken)}: generated_predictions.txt already has fields of that name "
            f"({', '.join(PREDICTION_FIELDS)})"
        ]
    return []


def _task_problems(config: RunConfig) -> list[str]:
    data, training, problems = config.data, config.training, []
    if not (training.do_train or training.do_eval or training.do_predict):
        problems.append("nothing to do: give --do_train, --do_eval and/or --do_predict")
    for flag, needed_file, file_flag in [
        ("do_train", data.train_file, "train_file"),
        ("do_eval", data.validation_file, "validation_file"),
        ("do_predict", data.test_file, "test_file"),
    ]:
        if getattr(training, flag) and not needed_file:
            problems.append(f"--{flag} needs --{file_flag}")
    if data.test_file and not training.do_predict:
        problems.append("--test_file is given but --do_predict is not: add --do_predict, or drop --test_file")
    return problems + _keep_columns_problems(config)


def _unknown_flags(error: ValueError) -> str:
    """HfArgumentParser's "Some specified arguments are not used by the HfArgumentParser: [...]" in a user's words
    (a flag of another version, e.g. transformers 4's --warmup_ratio, or a typo)."""
    message = str(error)
    prefix = "Some specified arguments are not used by the HfArgumentParser: "
    if not message.startswith(prefix):
        return message
    return f"unknown flags: {' '.join(_as_list(message[len(prefix) :]))} (--help lists the flags)"


def _as_list(text: str) -> list:
    import ast

    try:
        return [str(x) for x in ast.literal_eval(text)]
    except (ValueError, SyntaxError):
        return [text]


def _path_problems(config: RunConfig) -> list[str]:
    problems = []
    for flag in ("train_file", "validation_file", "test_file"):
        problems += _data_file_problems(flag, getattr(config.data, flag))
    model_dir = config.model.model_name_or_path
    if not os.path.isdir(model_dir):
        problems.append(f"--model_name_or_path {model_dir}: no such folder (models are loaded from local folders only)")
    elif not os.path.isfile(os.path.join(model_dir, "config.json")):
        problems.append(f"--model_name_or_path {model_dir}: not a model folder (no config.json in it)")
    for flag, path in (
        ("ptuning_checkpoint", config.ptuning.ptuning_checkpoint),
        ("lora_checkpoint", config.lora.lora_checkpoint),
    ):
        if path is not None:
            problems += _checkpoint_problems(flag, path)
    problems += _output_dir_problems(config)
    problems += _resume_problems(config)
    return problems


def _checkpoint_problems(flag: str, path: str) -> list[str]:
    """The folder exists and holds the method's files (a wrong folder fails here, before the base is loaded)."""
    from glmtune import lora, ptuning

    if not os.path.isdir(path):
        return [f"--{flag} {path}: no such folder"]
    if flag == "lora_checkpoint" and not lora.is_checkpoint(path):
        hint = ": it holds a P-Tuning v2 prefix (--ptuning_checkpoint)" if ptuning.is_checkpoint(path) else ""
        return [f"--lora_checkpoint {path}: not a LoRA adapter folder (no {lora.CONFIG_FILE}){hint}"]
    if flag == "ptuning_checkpoint" and not ptuning.is_checkpoint(path):
        hint = ": it holds a LoRA adapter (--lora_checkpoint)" if lora.is_checkpoint(path) else ""
        return [
            f"--ptuning_checkpoint {path}: not a P-Tuning v2 checkpoint (no {ptuning.CONFIG_FILE}, nor the "
            f"ancestors' {ptuning.ORIGINAL_WEIGHTS}){hint}"
        ]
    return []


def _data_file_problems(flag: str, path) -> list[str]:
    if path is None:
        return []
    if os.path.isdir(path):
        return [f"--{flag} {path}: is a folder, expected a {_extensions()} file"]
    if not os.path.isfile(path):
        return [f"--{flag} {path}: no such file"]
    if not path.endswith(DATA_EXTENSIONS):
        return [f"--{flag} {path}: expected a {_extensions()} file (JSON lines, a JSON array, CSV or TSV)"]
    return []


def _extensions() -> str:
    return ", ".join(DATA_EXTENSIONS[:-1]) + " or " + DATA_EXTENSIONS[-1]


def _output_dir_problems(config: RunConfig) -> list[str]:
    training = config.training
    # Every task writes there (weights, metrics, predictions): find out now, not after the work is done.
    ancestor = os.path.abspath(training.output_dir)
    while not os.path.exists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        return [f"--output_dir {training.output_dir}: cannot be created, {ancestor} is not a folder"]
    if not os.access(ancestor, os.W_OK | os.X_OK):
        return [f"--output_dir {training.output_dir}: cannot be written, {ancestor} is not writable"]
    return previous_run_problems(config)


def _resume_problems(config: RunConfig) -> list[str]:
    """A --resume_from_checkpoint folder must exist before anything is written (glmtune.runs checks the rest)."""
    resume = config.training.resume_from_checkpoint
    if not config.training.do_train or resume is None or str(resume).lower() in ("last", "true"):
        return []
    if not os.path.isdir(resume):
        return [f"--resume_from_checkpoint {resume}: no such folder"]
    return []


def _prepared(method: str, args):
    """argv (or a dict) with the flags the Trainer must see while TrainingArguments are built."""
    return _bf16_for_full_finetuning(method, _on_cpu_without_gpu(args))


def _bf16_for_full_finetuning(method: str, args):
    """Full fine-tuning on a GPU with bf16: ``--bf16`` (mixed precision) unless --bf16, --fp16 or --use_cpu is given.

    Why: its trained weights stay float32, where small updates are not rounded away, and the compute runs in bf16,
    as the ancestors' full fine-tuning ran with --fp16; DeepSpeed takes its "auto" bf16 from the flag. Like
    --use_cpu, it goes into the arguments: TrainingArguments settle mixed precision while they are built."""
    if method != "finetune" or not (_cuda_available() and _bf16_supported()):
        return args
    if {"bf16", "fp16", "use_cpu"} & _flag_names(args):
        return args
    return {"bf16": True, **args} if isinstance(args, dict) else ["--bf16", *args]


def _flag_names(args) -> set:
    if isinstance(args, dict):
        return set(args)
    return {arg[2:].split("=", 1)[0].replace("-", "_") for arg in args if arg.startswith("--")}


def _on_cpu_without_gpu(args):
    """No CUDA here: the run's processes are CPU processes (``--use_cpu``; torchrun's are joined over gloo),
    unless the arguments say otherwise.

    Why: otherwise accelerate ignores torchrun's LOCAL_RANK on a machine without a GPU (each process would
    train alone on all the data, all writing into one --output_dir), and --deepspeed hangs setting up.
    TrainingArguments set up the processes while they are built, so this goes into the arguments themselves.
    """
    if _cuda_available():
        return args
    if isinstance(args, dict):
        return {"use_cpu": True, **args}
    given = any(arg == "--use_cpu" or arg.startswith("--use_cpu=") for arg in args)
    return args if given else ["--use_cpu", *args]


def zero_stage(training) -> int | None:
    """The DeepSpeed ZeRO stage of --deepspeed (None without DeepSpeed)."""
    if not training.deepspeed:
        return None
    return _zero_config(training).get("stage", 0)


def _distributed_problems(config: RunConfig) -> list[str]:
    """How the processes and GPUs are used: one process per GPU, and what DeepSpeed cannot do (README,
    Several GPUs and machines, says what was measured)."""
    training, problems = config.training, []
    if training.n_gpu > 1:  # one process that sees several GPUs: transformers would wrap it in DataParallel
        problems.append(
            f"{training.n_gpu} GPUs are visible to one process, which would drive them with DataParallel "
            "(uneven memory, "
            "and glmtune's loss and prefix hooks do not support it): start one process per GPU with "
            f"NUM_GPUS={training.n_gpu} (torchrun), or choose one GPU with CUDA_VISIBLE_DEVICES=0"
        )
    stage, bits = zero_stage(training), config.model.quantization_bit
    if stage is None:
        return problems
    if config.method == "finetune" and training.do_train:
        problems += _full_finetuning_deepspeed_problems(training)
    if not _cuda_available():
        return problems + [
            f"--deepspeed {_name(training.deepspeed)} needs CUDA GPUs, and none is visible here: drop it "
            "(NUM_GPUS=N without DEEPSPEED runs N data-parallel processes, on CPUs too)"
        ]
    if config.run.compile_layers and stage == 3:
        problems.append(
            f"--compile_layers cannot be combined with DeepSpeed ZeRO-3 (--deepspeed {_name(training.deepspeed)}): "
            "compiled "
            "layers see ZeRO-3's partitioned (empty) weights, LoRA fails to compile and P-Tuning v2 drifts from the "
            "uncompiled loss; remove the flag (ZeRO-3 runs uncompiled by default) or use a ZeRO-2 config"
        )
    if bits and stage == 3:
        problems.append(
            f"--quantization_bit {bits} cannot be combined with DeepSpeed ZeRO-3 "
            f"(--deepspeed {_name(training.deepspeed)}): transformers loads a bitsandbytes base onto one GPU "
            "(device_map), which ZeRO-3 refuses since it partitions "
            "the base; use a ZeRO-2 config, or plain data parallelism (NUM_GPUS without DEEPSPEED)"
        )
    return problems


def _optimizer_problems(training) -> list[str]:
    """bitsandbytes' 8-bit optimizers (--optim adamw_8bit, paged_adamw_8bit, ...): installed, and on the GPU."""
    optim = str(getattr(training.optim, "value", training.optim))
    if "8bit" not in optim:
        return []
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        return [f"--optim {optim} needs bitsandbytes: pip install -r requirements-gpu.txt"]
    if zero_stage(training) is not None and "offload_optimizer" in _zero_config(training):
        return [
            f"--optim {optim} keeps the optimizer state in 8 bits on the GPU, and --deepspeed "
            f"{_name(training.deepspeed)} moves the optimizer to the CPU (offload_optimizer): use one of them"
        ]
    return []


def _full_finetuning_deepspeed_problems(training) -> list[str]:
    """A full model is saved from ZeRO-3 only if its shards are gathered into one state dict at each save."""
    if zero_stage(training) != 3 or _zero_config(training).get("stage3_gather_16bit_weights_on_model_save"):
        return []
    return [
        f"--deepspeed {_name(training.deepspeed)}: full fine-tuning saves the whole model, and this ZeRO-3 config "
        'keeps it in shards: set "stage3_gather_16bit_weights_on_model_save": true in its zero_optimization '
        "(as scripts/deepspeed/zero3*.json do)"
    ]


def _zero_config(training) -> dict:
    return training.hf_deepspeed_config.config.get("zero_optimization", {})


def _name(deepspeed) -> str:
    return deepspeed if isinstance(deepspeed, str) else "<dict>"


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _bf16_supported() -> bool:
    import torch

    return torch.cuda.is_bf16_supported()


def _fill_defaults(config: RunConfig) -> None:
    data, training = config.data, config.training
    if config.method == "finetune":
        _full_finetuning_defaults(config)
    if data.val_max_target_length is None:
        data.val_max_target_length = data.max_target_length
    _fill_method_settings(config)
    # Non-reentrant checkpointing lets gradients reach the prefix encoder, whose output every
    # checkpointed layer reads without receiving it as an input (reentrant mode would drop them).
    if training.gradient_checkpointing_kwargs is None:
        training.gradient_checkpointing_kwargs = {"use_reentrant": False}
    if training.do_predict:
        training.predict_with_generate = True  # prediction means generating text to score
    if config.run.compile_layers is None:
        config.run.compile_layers = (
            training.do_train
            and _cuda_available()
            and zero_stage(training) != 3  # see _distributed_problems
            and config.lora.lora_variant != "adalora"  # its layers keep PEFT's forward (glmtune.speed.fast_lora)
            # PEFT's DoRA reads the 4/8-bit weight's class: a graph break in every layer, not measured on a GPU
            and not (config.lora.use_dora and config.model.quantization_bit)
        )
    if config.run.padding_free is None and not (
        training.do_train and _cuda_available() and config.model.torch_dtype != "float32"
    ):
        config.run.padding_free = False  # otherwise decided with the model loaded (glmtune.speed.prepare)
    if not _cuda_available():
        training.dataloader_pin_memory = False  # pinning only helps copies to a GPU (and warns without one)
    if training.ddp_find_unused_parameters is None:  # both methods use every trainable weight in each step
        training.ddp_find_unused_parameters = False
    training.remove_unused_columns = False  # our collators build exactly the model's inputs
    training.label_names = ["labels"]  # PEFT wrappers hide the forward signature the Trainer reads this from


def _fill_method_settings(config: RunConfig) -> None:
    """The trained weights' settings: the flags given, else the checkpoint's, else the defaults (glmtune.settings)."""
    if config.method == "finetune":
        return
    if config.method == "ptuning":
        for name, value in settings.prefix_settings(config)[0].items():
            setattr(config.ptuning, name, value)
        return
    for name, value in settings.lora_settings(config.lora, config.given)[0].items():
        setattr(config.lora, name, value)
    if config.lora.lora_variant == "adalora":  # its orthogonality penalty comes with PEFT's loss from labels
        config.run.target_token_loss = False


def _full_finetuning_defaults(config: RunConfig) -> None:
    """Full fine-tuning trains the base itself (glmtune.finetune)."""
    training, run = config.training, config.run
    if training.do_train and config.model.torch_dtype == "auto" and not training.deepspeed:
        # The trained weights stay float32, as every method's trainable weights do (--bf16 computes in bf16);
        # DeepSpeed keeps its own float32 copy and loads the 16-bit base.
        config.model.torch_dtype = "float32"
    # The fast path and the memory plan were measured on frozen bases only (docs/benchmarks.md): opt in by flag.
    for name in ("compile_layers", "padding_free"):
        if getattr(run, name) is None:
            setattr(run, name, False)
    if "fit_memory" not in config.given:
        run.fit_memory = False
