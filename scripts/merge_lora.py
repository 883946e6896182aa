"""Merge LoRA adapters into their base model: a plain model folder that transformers loads alone.

    CHECKPOINT=output/adgen-toy-train-lora-8-5e-3 bash lora/merge.sh
    python3 scripts/merge_lora.py --model_name_or_path /path/to/glm-4-9b --checkpoint output/my-lora \\
        --output output/my-lora-merged --torch_dtype bfloat16
    python3 scripts/merge_lora.py --model_name_or_path /path/to/llama-7b --checkpoint output/stage1,output/stage2

The base is loaded in full precision (never quantized), each adapter's low-rank updates are added into its
weights in the order given (PEFT's merge_and_unload; its --modules_to_save modules replace the base's), and
the result is saved as *.safetensors files of at most --max_shard_size (with an index when there are several),
with the tokenizer and the generation config. Several adapters (--checkpoint a,b or --checkpoint a
--checkpoint b) are a chain: b applies to the base with a merged, as when b was trained on that merged model.
A base whose tokenizer has more tokens than its embeddings is first resized to the tokenizer saved with the
adapter. It is written to OUTPUT.partial and renamed to OUTPUT when complete, so OUTPUT is never a
half-written folder. Only LoRA merges: a P-Tuning v2 prefix is extra key/value states, not a change of
weights.
"""

import json
import logging
import os

from glmtune.errors import GlmtuneError, exit_with
from glmtune.report import quiet_progress_bars
from glmtune.serve import options

logger = logging.getLogger("merge_lora")


def parse_args(argv=None):
    parser = options.parser(__doc__.split("\n\n")[0], prompts=False, chain=True)
    # The merge needs the full-precision base: float32 unless asked otherwise, and --quantization_bit is refused.
    parser.set_defaults(torch_dtype="float32")
    merge = parser.add_argument_group("merge")
    merge.add_argument("--output", default=None, help="merged model folder (default: the last CHECKPOINT + -merged)")
    merge.add_argument("--max_shard_size", default="2GB", help="largest *.safetensors file, e.g. 2GB, 500MB")
    merge.add_argument("--overwrite", action="store_true", help="replace an existing OUTPUT folder")
    return parser.parse_args(argv)


def check_args(args) -> None:

    if args.quantization_bit:
        raise GlmtuneError(
            f"--quantization_bit {args.quantization_bit}: a LoRA adapter is merged into the full-precision base, "
            "not into quantized weights. Leave the flag out: the base is loaded unquantized (--torch_dtype float32 "
            "or bfloat16), merged and saved; quantize the merged model when you load it (--quantization_bit 4 in "
            "the other scripts). An adapter trained on a 4-bit base merges into the bf16/fp32 base just the same."
        )
    if args.torch_dtype == "auto":
        raise GlmtuneError("--torch_dtype auto: choose the dtype of the merged weights: float32, bfloat16 or float16")
    if not args.checkpoint:
        raise GlmtuneError("--checkpoint is required: the LoRA adapter folder(s) (adapter_config.json) to merge")
    found = options.problems(args)
    if found:
        raise GlmtuneError("\n".join(found))
    for folder in args.checkpoint:
        _check_adapter(folder)
    args.output = args.output or args.checkpoint[-1].rstrip("/\\") + "-merged"
    output = os.path.realpath(args.output)
    inputs = [("--model_name_or_path", args.model_name_or_path)] + [("--checkpoint", c) for c in args.checkpoint]
    for flag, path in inputs:
        path = os.path.realpath(path)
        if output == path or path.startswith(output + os.sep):
            raise GlmtuneError(f"--output {args.output} would replace {flag} {path}: choose another folder")
    if os.path.exists(args.output) and not args.overwrite:
        raise GlmtuneError(
            f"--output {args.output} already exists: pass --overwrite to replace it, or choose another folder"
        )
    if os.path.exists(args.output) and not os.path.isdir(args.output):
        raise GlmtuneError(f"--output {args.output} is a file, not a folder")
    from transformers.utils.hub import convert_file_size_to_int

    try:
        convert_file_size_to_int(args.max_shard_size)
    except ValueError:
        raise GlmtuneError(f"--max_shard_size {args.max_shard_size}: not a size (e.g. 2GB, 500MB)") from None


def _check_adapter(folder: str) -> None:
    from glmtune.serve.tuned import checkpoint_method

    if checkpoint_method(folder) == "ptuning":
        raise GlmtuneError(
            f"--checkpoint {folder} is a P-Tuning v2 checkpoint: its prefix is extra key/value states "
            "fed to every layer, not a change of weights, so it cannot be merged into the model. Load it with "
            "the base instead (--checkpoint in scripts/cli_demo.py, --ptuning_checkpoint in ptuning/main.py)."
        )
    if _initialized_with(folder) == "loftq":
        raise GlmtuneError(
            f"--checkpoint {folder} was trained with --init_lora_weights loftq: it makes up for the error of "
            "the 4-bit base it was trained on, so merged into the full-precision base it would add that error back. "
            "Use it unmerged on the 4-bit base (QUANTIZATION_BIT=4 in evaluate.sh and the demos)."
        )


def _initialized_with(checkpoint: str) -> str | None:
    """How the adapter started, from the run.json glmtune writes beside it (PEFT's config says true for LoftQ: its
    LoftQ on a quantized base replaces the weights after a plain start)."""
    from glmtune.runs import IDENTITY_FILE

    try:
        with open(os.path.join(checkpoint, IDENTITY_FILE), encoding="utf-8") as f:
            return json.load(f).get("trained_weights", {}).get("init_lora_weights")
    except (OSError, ValueError, AttributeError):
        return None  # an adapter from elsewhere, or a run from before the option


def merge(args) -> str:
    """Load base + adapter, merge, save (atomically: glmtune.lora.merge_and_save); returns OUTPUT."""
    from glmtune.arguments import ModelArguments
    from glmtune.lora import merge_and_save
    from glmtune.model import load_base_model, load_plain_tokenizer

    model_args = ModelArguments(
        model_name_or_path=args.model_name_or_path,
        torch_dtype=args.torch_dtype,
        trust_remote_code=args.trust_remote_code,
    )
    try:  # the tokenizer as the base ships it (no pad token added, unlike training's loader)
        tokenizer = load_plain_tokenizer(model_args)
    except (OSError, ValueError) as error:
        raise GlmtuneError(
            f"--model_name_or_path {args.model_name_or_path}: cannot load its tokenizer: {error}"
        ) from None
    adapters = ", then ".join(args.checkpoint)
    logger.info("Merging %s into %s (%s)", adapters, args.model_name_or_path, args.torch_dtype)
    merge_and_save(load_base_model(model_args), args.checkpoint, tokenizer, args.output, args.max_shard_size)
    return args.output


def main(argv=None) -> None:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    args = parse_args(argv)
    quiet_progress_bars()
    try:
        check_args(args)
        output = merge(args)
    except GlmtuneError as error:
        exit_with(error)
    shards = sorted(name for name in os.listdir(output) if name.endswith(".safetensors"))
    size = sum(os.path.getsize(os.path.join(output, name)) for name in shards)
    print(
        f"Merged {', then '.join(args.checkpoint)} into {args.model_name_or_path}: {output} "
        f"({len(shards)} safetensors file{'s' if len(shards) != 1 else ''}, {size / 2**20:.1f} MiB, {args.torch_dtype})"
    )


if __name__ == "__main__":
    main()
