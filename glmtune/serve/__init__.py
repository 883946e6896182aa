"""The use side: a tuned model loaded for chat, serving or merging.

* ``options`` - the command-line options every tool shares (declared once), and loading what they name;
* ``tuned`` - base + checkpoint, prompts built as in training, batched and streamed generation;
* ``api`` / ``worker`` / ``app`` - the OpenAI-compatible API: request checks, the worker that owns the
  model, the FastAPI app (needs the demo extras, requirements-demo.txt).
"""

DEFAULT_MAX_NEW_TOKENS = 128  # as training's default --max_target_length
