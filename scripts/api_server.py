"""An OpenAI-compatible HTTP API for a tuned model (FastAPI + uvicorn): GET /v1/models, POST /v1/chat/completions.

    bash scripts/api_server.sh                                    # the embedded tiny model on 127.0.0.1:8000
    python scripts/api_server.py --model_name_or_path MODEL --checkpoint output/adgen-toy-lora --port 8000

    curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
        -d '{"model": "glm", "messages": [{"role": "user", "content": "类型#裙*颜色#蓝色"}], "max_tokens": 32}'

Needs `pip install fastapi uvicorn` (see requirements-demo.txt); any OpenAI client works against it
(base_url http://127.0.0.1:8000/v1).

What requests may hold, how they are checked and batched: glmtune/serving.py.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout, no install

from glmtune.parsing import TEMPLATES  # noqa: E402


# ----------------------------------------------------------------------------- command line


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="OpenAI-compatible API server for a glmtune model.")
    parser.add_argument("--model_name_or_path", default="models/tiny-glm", help="base model folder")
    parser.add_argument("--checkpoint", default=None, help="P-Tuning v2 checkpoint folder or LoRA adapter folder")
    parser.add_argument(
        "--quantization_bit", type=int, choices=[4, 8], default=None, help="4 or 8 (CUDA + bitsandbytes)"
    )
    parser.add_argument(
        "--prompt_template", default="auto", choices=TEMPLATES, help="prompt format, as in training (default auto)"
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--api_key",
        default=os.environ.get("GLMTUNE_API_KEY") or None,
        help="require 'Authorization: Bearer <key>' (default: $GLMTUNE_API_KEY; unset: no key)",
    )
    parser.add_argument(
        "--model_name",
        default=None,
        help="model id in /v1/models and replies (default: the checkpoint's or model's folder name)",
    )
    parser.add_argument("--max_source_length", type=int, default=1024, help="longest prompt in tokens; longer: 400")
    parser.add_argument("--max_batch_size", type=int, default=8, help="most requests answered by one generate call")
    args = parser.parse_args(argv)
    if args.max_source_length < 1:
        parser.error("--max_source_length must be >= 1")
    if args.max_batch_size < 1:
        parser.error("--max_batch_size must be >= 1")
    if not 0 <= args.port <= 65535:
        parser.error("--port must be between 0 and 65535")
    return args


def main(argv=None):
    args = parse_args(argv)
    try:
        import uvicorn
    except ImportError:
        print("error: the API server needs fastapi and uvicorn: pip install -r requirements-demo.txt", file=sys.stderr)
        sys.exit(2)
    # The cheap checks first, so that a mistyped path fails at once, before torch and transformers load.
    problem = None
    if not os.path.isfile(os.path.join(args.model_name_or_path, "config.json")):
        problem = f"model {args.model_name_or_path}: not a model folder (no config.json)"
    elif args.checkpoint and not os.path.isdir(args.checkpoint):
        problem = f"checkpoint {args.checkpoint}: no such folder"
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(2)
    from glmtune.errors import GlmtuneError
    from glmtune.inference import load_tuned

    try:
        tuned = load_tuned(
            args.model_name_or_path,
            args.checkpoint,
            args.quantization_bit,
            prompt_template=args.prompt_template,
            max_source_length=args.max_source_length,
        )
    except (GlmtuneError, OSError, ValueError) as error:
        for line in str(error).splitlines() or [type(error).__name__]:
            print(f"error: {line}", file=sys.stderr)
        sys.exit(2)
    folder = args.checkpoint or args.model_name_or_path
    model_name = args.model_name or os.path.basename(os.path.normpath(folder))
    from glmtune.serving import create_app

    app = create_app(tuned, model_name, args.api_key, args.max_batch_size, args.max_source_length)
    print(
        f"Serving {model_name} ({tuned.method}) on http://{args.host}:{args.port}/v1"
        + (" (API key required)" if args.api_key else ""),
        file=sys.stderr,
        flush=True,
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")


if __name__ == "__main__":
    main()
