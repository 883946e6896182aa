"""An OpenAI-compatible HTTP API for a tuned model (FastAPI + uvicorn): GET /v1/models, POST /v1/chat/completions.

    bash scripts/api_server.sh                                    # the embedded tiny model on 127.0.0.1:8000
    python scripts/api_server.py --model_name_or_path MODEL --checkpoint output/adgen-toy-train-lora-8-5e-3 --port 8000

    curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
        -d '{"model": "glm", "messages": [{"role": "user", "content": "类型#裙*颜色#蓝色"}], "max_tokens": 32}'

Needs `pip install fastapi uvicorn` (see requirements-demo.txt); any OpenAI client works against it
(base_url http://127.0.0.1:8000/v1).

What requests may hold and how they are checked: glmtune/serve/api.py; how they are batched: glmtune/serve/worker.py.
"""

import os
import sys

from glmtune.errors import GlmtuneError, exit_with
from glmtune.serve import options


def parse_args(argv=None):
    parser = options.parser("OpenAI-compatible API server for a glmtune model.")
    server = parser.add_argument_group("server")
    server.add_argument("--host", default="127.0.0.1")
    server.add_argument("--port", type=int, default=8000)
    server.add_argument(
        "--api_key",
        default=os.environ.get("GLMTUNE_API_KEY") or None,
        help="require 'Authorization: Bearer <key>' (default: $GLMTUNE_API_KEY; unset: no key)",
    )
    server.add_argument(
        "--model_name",
        default=None,
        help="model id in /v1/models and replies (default: the checkpoint's or model's folder name)",
    )
    server.add_argument("--max_batch_size", type=int, default=8, help="most requests answered by one generate call")
    args = parser.parse_args(argv)
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
        exit_with(GlmtuneError("the API server needs fastapi and uvicorn: pip install -r requirements-demo.txt"))
    tuned = options.load_or_exit(args)  # the cheap checks first: a mistyped path fails before torch loads
    folder = args.checkpoint or args.model_name_or_path
    model_name = args.model_name or os.path.basename(os.path.normpath(folder))
    from glmtune.serve.app import create_app

    app = create_app(tuned, model_name, args.api_key, args.max_batch_size)
    print(
        f"Serving {model_name} ({tuned.method}) on http://{args.host}:{args.port}/v1"
        + (" (API key required)" if args.api_key else ""),
        file=sys.stderr,
        flush=True,
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")


if __name__ == "__main__":
    main()
