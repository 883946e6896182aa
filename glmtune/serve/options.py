"""The options of every tool that uses a tuned model (cli_demo, web_demo, api_server, merge_lora), declared once.

A tool builds its parser with :func:`parser`, adds its own options, then calls :func:`load` (or checks the
model options with :func:`problems` first). The defaults are training's (``glmtune.arguments``), so a model
is prompted exactly as it was trained.
"""

import argparse
import os

from glmtune.arguments import DEFAULT_MAX_SOURCE_LENGTH, DTYPES, GenerationArguments
from glmtune.errors import GlmtuneError
from glmtune.prompt import TEMPLATES
from glmtune.serve import DEFAULT_MAX_NEW_TOKENS

DEFAULT_MODEL = "models/tiny-glm"  # the embedded default (scripts/ensure_model.sh builds it)
_GENERATION_DEFAULTS = GenerationArguments()


def parser(
    description: str, prompts: bool = True, generation: bool = False, chain: bool = False
) -> argparse.ArgumentParser:
    """The model options (and, with ``prompts``, how prompts are built; with ``generation``, decoding; with
    ``chain``, --checkpoint takes several LoRA adapters, as a list)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    model = parser.add_argument_group("model")
    model.add_argument("--model_name_or_path", default=DEFAULT_MODEL, help="local base model folder")
    if chain:
        model.add_argument(
            "--checkpoint",
            action="extend",
            type=_paths,
            help="LoRA adapter folders, applied in order: --checkpoint a,b or --checkpoint a --checkpoint b",
        )
    else:
        model.add_argument(
            "--checkpoint",
            default=None,
            type=_none_or_path,
            help="P-Tuning v2 checkpoint or LoRA adapter folder (the kind is detected); none: the base alone",
        )
    model.add_argument(
        "--quantization_bit",
        type=int,
        choices=[4, 8],
        default=None,
        help="quantize the base to 4 or 8 bits at load time (CUDA GPU + bitsandbytes)",
    )
    model.add_argument("--torch_dtype", default="auto", choices=DTYPES, help="dtype of the base, as in training")
    model.add_argument(
        "--trust_remote_code",
        action="store_true",
        help="allow the model folder to run its own Python code (off: it executes code)",
    )
    if prompts:
        group = parser.add_argument_group("prompts (as in training)")
        group.add_argument(
            "--prompt_template",
            default="auto",
            choices=TEMPLATES,
            help="the template the checkpoint was trained with (default auto, as in training)",
        )
        group.add_argument("--source_prefix", default="", help="text put before every query, as in training")
        group.add_argument(
            "--max_source_length",
            type=_positive_int,
            default=DEFAULT_MAX_SOURCE_LENGTH,
            help="prompt tokens kept, history included (as in training)",
        )
    if generation:
        group = parser.add_argument_group("decoding")
        group.add_argument("--max_new_tokens", type=_positive_int, default=DEFAULT_MAX_NEW_TOKENS)
        group.add_argument("--do_sample", action="store_true", help="sample instead of greedy decoding")
        group.add_argument("--top_p", type=float, default=_GENERATION_DEFAULTS.top_p)
        group.add_argument("--temperature", type=float, default=_GENERATION_DEFAULTS.temperature)
    return parser


def problems(args) -> list[str]:
    """What is wrong with the model options, found without loading anything heavy."""
    found = []
    if not os.path.isfile(os.path.join(args.model_name_or_path, "config.json")):
        found.append(f"--model_name_or_path {args.model_name_or_path}: not a model folder (no config.json)")
    checkpoints = args.checkpoint if isinstance(args.checkpoint, list) else [args.checkpoint]
    missing = [folder for folder in checkpoints if folder and not os.path.isdir(folder)]
    found += [f"--checkpoint {folder}: no such folder" for folder in missing]
    if args.quantization_bit and not _cuda_available():
        found.append(f"--quantization_bit {args.quantization_bit} needs a CUDA GPU (bitsandbytes quantizes on the GPU)")
    return found


def load_or_exit(args):
    """:func:`load`, or one ``error:`` line per problem and exit 2 (a bad folder or file: no traceback)."""
    from glmtune.errors import exit_with

    try:
        return load(args)
    except (GlmtuneError, OSError, ValueError) as error:
        exit_with(error)


def load(args):
    """The tuned model the options name (checked first: one ``GlmtuneError`` listing every problem)."""
    found = problems(args)
    if found:
        raise GlmtuneError("\n".join(found))
    from glmtune.report import quiet_progress_bars
    from glmtune.serve.tuned import load_tuned

    quiet_progress_bars()

    return load_tuned(
        args.model_name_or_path,
        args.checkpoint,
        quantization_bit=args.quantization_bit,
        torch_dtype=args.torch_dtype,
        prompt_template=args.prompt_template,
        source_prefix=args.source_prefix,
        max_source_length=args.max_source_length,
        trust_remote_code=args.trust_remote_code,
    )


def generate_kwargs(args) -> dict:
    return {
        "max_new_tokens": args.max_new_tokens,
        "do_sample": args.do_sample,
        "top_p": args.top_p,
        "temperature": args.temperature,
    }


def _paths(value: str) -> list[str]:
    return [path for path in value.split(",") if path]


def _none_or_path(value: str):
    return None if value in ("", "none") else value


def _positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {number}")
    return number


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()
