"""Chat with a base model or a tuned one in the terminal, in the style of ChatGLM's cli_demo.py.

    bash scripts/cli_demo.sh                                   # the embedded tiny model, untuned
    CHECKPOINT=output/adgen-toy-lora-8-5e-3 bash scripts/cli_demo.sh
    python3 scripts/cli_demo.py --model_name_or_path /path/to/glm-4-9b --checkpoint output/my-pt --quantization_bit 4

Type a message to chat (the earlier rounds are kept, in the model's own prompt format); "clear" forgets
the history, "stop", "exit", "quit" or end of input (Ctrl-D) quits.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout, no install

from glmtune.errors import GlmtuneError  # noqa: E402
from glmtune.parsing import TEMPLATES  # noqa: E402

USER_PROMPT = "用户："
BOT_PROMPT = "ChatGLM："
STOP_COMMANDS = {"stop", "exit", "quit"}
METHOD_NAMES = {"ptuning": "P-Tuning v2 checkpoint", "lora": "LoRA adapter"}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model_name_or_path", default="models/tiny-glm", help="local base model folder")
    parser.add_argument(
        "--checkpoint",
        default=None,
        help="P-Tuning v2 checkpoint folder or LoRA adapter folder (the kind is detected); none: the base alone",
    )
    parser.add_argument(
        "--quantization_bit",
        type=int,
        choices=[4, 8],
        default=None,
        help="quantize the base to 4 or 8 bits at load time (CUDA GPU + bitsandbytes)",
    )
    parser.add_argument("--torch_dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument(
        "--prompt_template",
        default="auto",
        choices=TEMPLATES,
        help="the template the checkpoint was trained with (default auto, as in training)",
    )
    parser.add_argument("--source_prefix", default="", help="text put before every query, as in training")
    parser.add_argument(
        "--max_source_length",
        type=int,
        default=1024,
        help="prompt tokens kept (history included; the oldest text is cut first as in training)",
    )
    parser.add_argument("--max_new_tokens", type=int, default=128)
    parser.add_argument("--do_sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--top_p", type=float, default=0.7)
    parser.add_argument("--temperature", type=float, default=0.95)
    return parser.parse_args(argv)


def load(args):
    import torch

    from glmtune.inference import load_tuned

    if args.quantization_bit and not torch.cuda.is_available():
        raise GlmtuneError(
            f"--quantization_bit {args.quantization_bit} needs a CUDA GPU (bitsandbytes quantizes on the GPU)"
        )
    return load_tuned(
        args.model_name_or_path,
        args.checkpoint,
        quantization_bit=args.quantization_bit,
        torch_dtype=args.torch_dtype,
        prompt_template=args.prompt_template,
        source_prefix=args.source_prefix,
        max_source_length=args.max_source_length,
    )


def welcome(args, method: str) -> str:
    tuned = (
        f" + {METHOD_NAMES[method]} {args.checkpoint}" if method in METHOD_NAMES else " (no checkpoint: the base alone)"
    )
    return (
        f"欢迎使用 {args.model_name_or_path}{tuned}。输入内容即可对话，"
        f"clear 清空对话历史，stop / exit 退出 (type to chat; clear: forget the history; stop/exit: quit)"
    )


def read_query(echo: bool):
    """The next line typed, or None at end of input. Piped input is echoed so the transcript reads like a session."""
    try:
        query = input(f"\n{USER_PROMPT}")
    except EOFError:
        print()
        return None
    if echo:
        print(query)
    return query


def chat(tuned, args) -> None:
    generate_kwargs = {
        "max_new_tokens": args.max_new_tokens,
        "do_sample": args.do_sample,
        "top_p": args.top_p,
        "temperature": args.temperature,
    }
    history = []
    print(welcome(args, tuned.method), flush=True)
    echo = not sys.stdin.isatty()
    while True:
        query = read_query(echo)
        if query is None or query.strip().lower() in STOP_COMMANDS:
            return
        if query.strip().lower() == "clear":
            history = []
            if sys.stdout.isatty():
                os.system("cls" if os.name == "nt" else "clear")
            print(welcome(args, tuned.method), flush=True)
            continue
        if not query.strip():
            continue
        print(f"\n{BOT_PROMPT}", end="", flush=True)
        pieces = []
        for piece in tuned.stream(query, history, **generate_kwargs):
            if not pieces and not piece.strip():
                continue  # no leading blank text before the answer starts
            piece = piece if pieces else piece.lstrip()
            pieces.append(piece)
            print(piece, end="", flush=True)
        print(flush=True)
        history.append([query, "".join(pieces).strip()])


def main(argv=None) -> None:
    args = parse_args(argv)
    try:
        tuned = load(args)
    except GlmtuneError as error:
        for line in str(error).splitlines():
            print(f"error: {line}", file=sys.stderr)
        sys.exit(2)
    try:
        chat(tuned, args)
    except KeyboardInterrupt:
        print()


if __name__ == "__main__":
    main()
