"""Chat with a base model or a tuned one in the terminal, in the style of ChatGLM's cli_demo.py.

    bash scripts/cli_demo.sh                                   # the embedded tiny model, untuned
    CHECKPOINT=output/adgen-toy-train-lora-8-5e-3 bash scripts/cli_demo.sh
    python3 scripts/cli_demo.py --model_name_or_path /path/to/glm-4-9b --checkpoint output/my-pt --quantization_bit 4

Type a message to chat (the earlier rounds are kept, in the model's own prompt format); "clear" forgets
the history, "stop", "exit", "quit" or end of input (Ctrl-D) quits.
"""

import os
import sys

from glmtune.serve import options

USER_PROMPT = "用户："
BOT_PROMPT = "ChatGLM："
STOP_COMMANDS = {"stop", "exit", "quit"}
METHOD_NAMES = {"ptuning": "P-Tuning v2 checkpoint", "lora": "LoRA adapter"}


def parse_args(argv=None):
    return options.parser(__doc__.split("\n\n")[0], generation=True).parse_args(argv)


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
    generate_kwargs = options.generate_kwargs(args)
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
    tuned = options.load_or_exit(args)
    try:
        chat(tuned, args)
    except KeyboardInterrupt:
        print()


if __name__ == "__main__":
    main()
