"""The OpenAI-compatible chat API behind scripts/api_server.py: request checks, the worker that owns
the model, and the FastAPI app. Needs fastapi (requirements-demo.txt); nothing else in glmtune imports it.

Requests:
* messages: optional system (or developer) messages first, then user/assistant turns alternating, the last
  one from the user. Earlier user/assistant pairs become the history; the system messages (joined by a
  blank line) are put in front of the first user message, as "{system}\\n\\n{first user message}".
  Content is a string or a list of {"type": "text", "text": ...} parts.
* max_tokens (or max_completion_tokens; default 128), temperature, top_p, stream, n (only 1). Decoding is
  greedy unless temperature > 0, which samples with that temperature and top_p. stop is refused unless
  empty. "model" is accepted with any value; replies carry this server's --model_name. Other OpenAI
  fields (seed, user, ...) are ignored.
* A prompt longer than --max_source_length tokens is refused (400, code context_length_exceeded) rather
  than truncated. usage counts the prompt tokens and the generated tokens (the end-of-sequence token
  included when the model stopped by itself, finish_reason "stop"; "length" when max_tokens ran out).

One worker owns the model: requests wait in a queue; non-streaming requests with the same decoding
settings are answered together by one batched TunedModel.generate call (up to --max_batch_size), and
streaming requests one at a time. Generation runs in a thread, never on the event loop.
"""

import asyncio
import hmac
import json
import threading
import time
import uuid
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

DEFAULT_MAX_TOKENS = 128
SYSTEM_ROLES = ("system", "developer")


# ----------------------------------------------------------------------------- errors


class ApiError(Exception):
    """An error answered with OpenAI's JSON shape {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, param=None, code=None, type_="invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type_

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def invalid(message: str, param=None, code=None) -> ApiError:
    return ApiError(400, message, param, code)


# ----------------------------------------------------------------------------- requests


@dataclass
class Job:
    """One chat completion request, parsed and checked, waiting for the model."""

    query: str
    history: list
    prompt_tokens: int
    max_new_tokens: int
    temperature: float
    top_p: float
    stream: bool
    future: asyncio.Future = None  # non-streaming: resolved with (text, completion_tokens, finish_reason)
    pieces: asyncio.Queue = (
        None  # streaming: text pieces, then ("end", completion_tokens, finish_reason) or an exception
    )
    cancelled: threading.Event = field(default_factory=threading.Event)

    def generate_kwargs(self) -> dict:
        if self.temperature > 0:
            return {
                "max_new_tokens": self.max_new_tokens,
                "do_sample": True,
                "temperature": self.temperature,
                "top_p": self.top_p,
            }
        return {"max_new_tokens": self.max_new_tokens, "do_sample": False}

    def batch_key(self) -> tuple:
        """Requests with the same key can share one generate call."""
        return tuple(sorted(self.generate_kwargs().items()))


def _number(body: dict, name: str, default, low, high, integer=False, low_open=False):
    value = body.get(name)
    if value is None:
        return default
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        raise invalid(f"'{name}' must be {kind}, got {json.dumps(value)[:40]}", name)
    if value < low or (low_open and value == low) or (high is not None and value > high):
        bound = f"{'>' if low_open else '>='} {low}" + (f" and <= {high}" if high is not None else "")
        raise invalid(f"'{name}' must be {bound}, got {value}", name)
    return value


def _content(message: dict, index: int) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise invalid(
                    f"messages[{index}].content: only text parts ({{'type': 'text', 'text': ...}}) are supported",
                    f"messages[{index}].content",
                )
            texts.append(part["text"])
        return "".join(texts)
    raise invalid(f"messages[{index}].content must be a string or a list of text parts", f"messages[{index}].content")


def parse_messages(messages) -> tuple:
    """OpenAI messages -> (query, history as [[user, assistant], ...]); see the module docstring for the rules."""
    if messages is None:
        raise invalid("'messages' is required", "messages")
    if not isinstance(messages, list):
        raise invalid("'messages' must be a list of {role, content} objects", "messages")
    if not messages:
        raise invalid("'messages' must not be empty", "messages")
    system, turns = [], []
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise invalid(f"messages[{index}] must be an object with 'role' and 'content'", f"messages[{index}]")
        role = message.get("role")
        if not isinstance(role, str):
            raise invalid(f"messages[{index}].role must be a string", f"messages[{index}].role")
        if role not in (*SYSTEM_ROLES, "user", "assistant"):
            raise invalid(
                f"messages[{index}].role: unsupported role '{role}' (use system, user or assistant)",
                f"messages[{index}].role",
            )
        content = _content(message, index)
        if role in SYSTEM_ROLES:
            if turns:
                raise invalid(
                    f"messages[{index}]: a {role} message must come before the user/assistant messages",
                    f"messages[{index}].role",
                )
            system.append(content)
            continue
        expected = "user" if len(turns) % 2 == 0 else "assistant"
        if role != expected:
            raise invalid(
                f"messages[{index}].role: expected '{expected}' (user and assistant messages must alternate, "
                "starting with user)",
                f"messages[{index}].role",
            )
        turns.append(content)
    if not turns:
        raise invalid("'messages' has no user message", "messages")
    if len(turns) % 2 == 0:
        raise invalid("the last message must be from the user (role 'user'), not 'assistant'", "messages")
    if system:
        turns[0] = "\n\n".join(system) + "\n\n" + turns[0]
    history = [[turns[i], turns[i + 1]] for i in range(0, len(turns) - 1, 2)]
    return turns[-1], history


def prompt_length(tuned, query: str, history: list) -> int:
    """Tokens of the full prompt, untruncated, exactly as TunedModel.encode tokenizes it."""
    return len(tuned.encoder.prompt_ids(query, history))


def parse_request(body, tuned, max_source_length: int) -> Job:
    if not isinstance(body, dict):
        raise invalid("the request body must be a JSON object")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise invalid("'model' must be a string", "model")
    query, history = parse_messages(body.get("messages"))
    n = _number(body, "n", 1, 1, None, integer=True)
    if n != 1:
        raise invalid(f"'n' must be 1: this server returns one choice per request (got {n})", "n")
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise invalid("'stream' must be true or false", "stream")
    stop = body.get("stop")
    if stop is not None and not isinstance(stop, (str, list)):
        raise invalid("'stop' must be a string or a list of strings", "stop")
    if stop:
        raise invalid("'stop' sequences are not supported by this server; leave 'stop' out", "stop")
    name = (
        "max_completion_tokens"
        if body.get("max_tokens") is None and body.get("max_completion_tokens") is not None
        else "max_tokens"
    )
    max_tokens = _number(body, name, DEFAULT_MAX_TOKENS, 1, None, integer=True)
    temperature = _number(body, "temperature", 0.0, 0, 2)
    top_p = _number(body, "top_p", 1.0, 0, 1, low_open=True)
    tokens = prompt_length(tuned, query, history)
    if tokens > max_source_length:
        raise invalid(
            f"This model's maximum context length is {max_source_length} tokens, but the messages have "
            f"{tokens} tokens. Shorten the messages (or start the server with a larger --max_source_length).",
            "messages",
            "context_length_exceeded",
        )
    return Job(query, history, tokens, max_tokens, float(temperature), float(top_p), bool(stream))


# ----------------------------------------------------------------------------- the model worker


class TokenRecorder:
    """A stopping criterion that never stops generation by itself: it keeps the latest ids (to count the
    generated tokens and tell "stop" from "length") and stops every row once the request is cancelled."""

    def __init__(self, cancelled=None):
        self.ids = None
        self.cancelled = cancelled

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        self.ids = input_ids
        stop = self.cancelled is not None and self.cancelled.is_set()
        return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)

    def outcomes(self, prompt_width: int, stop_ids, max_new_tokens: int) -> list:
        """(completion_tokens, finish_reason) per row; ``stop_ids``: generate()'s eos_token_id (one or a list)."""
        if self.ids is None:
            return None
        stop_ids = set(stop_ids) if isinstance(stop_ids, (list, tuple)) else {stop_ids}
        results = []
        for row in self.ids[:, prompt_width:].tolist():
            stops = [i for i, token in enumerate(row) if token in stop_ids]
            if stops:
                results.append((stops[0] + 1, "stop"))
            else:
                results.append((len(row), "length" if len(row) >= max_new_tokens else "stop"))
        return results


class Worker:
    """Owns the model: takes jobs from a queue, batches compatible non-streaming ones, runs generation in a thread."""

    def __init__(self, tuned, max_batch_size: int):
        self.tuned = tuned
        self.max_batch_size = max_batch_size
        self.queue: asyncio.Queue = None
        self.waiting = deque()  # jobs taken from the queue but left for a later round (other decoding settings)
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="glmtune-model")
        self.task = None

    def start(self):
        self.queue = asyncio.Queue()
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self):
        if self.task:
            self.task.cancel()
        self.executor.shutdown(wait=False, cancel_futures=True)

    def submit(self, job: Job):
        loop = asyncio.get_running_loop()
        if job.stream:
            job.pieces = asyncio.Queue()
        else:
            job.future = loop.create_future()
        self.queue.put_nowait(job)

    async def _next(self) -> Job:
        return self.waiting.popleft() if self.waiting else await self.queue.get()

    async def _run(self):
        loop = asyncio.get_running_loop()
        while True:
            job = await self._next()
            if job.stream:
                await loop.run_in_executor(self.executor, self._stream, job, loop)
                continue
            batch, key = [job], job.batch_key()
            # Jobs already waiting with the same decoding settings join this batch; the others keep their order.
            candidates = list(self.waiting)
            while not self.queue.empty():
                candidates.append(self.queue.get_nowait())
            self.waiting.clear()
            for other in candidates:
                if len(batch) < self.max_batch_size and not other.stream and other.batch_key() == key:
                    batch.append(other)
                else:
                    self.waiting.append(other)
            batch = [j for j in batch if not j.future.done()]  # clients gone away
            if batch:
                await loop.run_in_executor(self.executor, self._generate, batch, loop)

    def _generate(self, batch: list, loop):
        tuned = self.tuned
        recorder = TokenRecorder()
        try:
            from transformers import StoppingCriteriaList

            width = max(len(tuned.encode(j.query, j.history)) for j in batch)
            texts = tuned.generate(
                [j.query for j in batch],
                [j.history for j in batch],
                stopping_criteria=StoppingCriteriaList([recorder]),
                **batch[0].generate_kwargs(),
            )
            outcomes = recorder.outcomes(
                width, tuned.prompt_format.generation_ids()["eos_token_id"], batch[0].max_new_tokens
            )
            outcomes = outcomes or [(0, "stop")] * len(batch)
            for job, text, (tokens, reason) in zip(batch, texts, outcomes):
                loop.call_soon_threadsafe(_resolve, job.future, (text, tokens, reason))
        except Exception as error:  # noqa: BLE001 - every waiting client gets the error, the worker lives on
            for job in batch:
                loop.call_soon_threadsafe(_fail, job.future, error)

    def _stream(self, job: Job, loop):
        tuned = self.tuned
        recorder = TokenRecorder(job.cancelled)
        try:
            from transformers import StoppingCriteriaList

            width = len(tuned.encode(job.query, job.history))
            for piece in tuned.stream(
                job.query, job.history, stopping_criteria=StoppingCriteriaList([recorder]), **job.generate_kwargs()
            ):
                loop.call_soon_threadsafe(job.pieces.put_nowait, piece)
            outcomes = recorder.outcomes(
                width, tuned.prompt_format.generation_ids()["eos_token_id"], job.max_new_tokens
            ) or [(0, "stop")]
            loop.call_soon_threadsafe(job.pieces.put_nowait, ("end", *outcomes[0]))
        except Exception as error:  # noqa: BLE001
            loop.call_soon_threadsafe(job.pieces.put_nowait, error)


def _resolve(future, value):
    if not future.done():
        future.set_result(value)


def _fail(future, error):
    if not future.done():
        future.set_exception(error)


class Trimmer:
    """Streams text with the same outer whitespace stripped as TunedModel.generate's answers: leading
    whitespace is dropped, trailing whitespace is held back until more text follows it."""

    def __init__(self):
        self.started = False
        self.held = ""

    def feed(self, piece: str) -> str:
        text = self.held + piece
        if not self.started:
            text = text.lstrip()
            if not text:
                return ""
            self.started = True
        body = text.rstrip()
        self.held = text[len(body) :]
        return body


# ----------------------------------------------------------------------------- the app


def create_app(tuned, model_name: str, api_key=None, max_batch_size: int = 8, max_source_length: int = 1024):
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    worker = Worker(tuned, max_batch_size)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app):
        worker.start()
        yield
        await worker.stop()

    app = FastAPI(title="glmtune OpenAI-compatible API", lifespan=lifespan)

    @app.exception_handler(ApiError)
    async def api_error(request, error: ApiError):
        headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else None
        return JSONResponse(error.body(), status_code=error.status, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, error):
        code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code)
        return JSONResponse(
            ApiError(error.status_code, str(error.detail), code=code).body(), status_code=error.status_code
        )

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, error):
        return JSONResponse(invalid(str(error)).body(), status_code=400)

    def authorize(request: Request):
        if not api_key:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise ApiError(
                401, "Invalid or missing API key: send 'Authorization: Bearer <key>'.", code="invalid_api_key"
            )

    def model_card() -> dict:
        return {"id": model_name, "object": "model", "created": created, "owned_by": "glmtune"}

    @app.get("/v1/models")
    async def list_models(request: Request):
        authorize(request)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str, request: Request):
        authorize(request)
        if model_id != model_name:
            raise ApiError(
                404,
                f"The model '{model_id}' does not exist; this server serves '{model_name}'.",
                "model",
                "model_not_found",
            )
        return model_card()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        authorize(request)
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as error:
            raise invalid(f"The request body is not valid JSON: {error}") from None
        job = parse_request(body, tuned, max_source_length)
        worker.submit(job)
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        now = int(time.time())
        if job.stream:
            return StreamingResponse(
                _events(job, completion_id, now),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        try:
            text, tokens, reason = await job.future
        except asyncio.CancelledError:
            job.future.cancel()
            raise
        except Exception as error:  # noqa: BLE001
            raise ApiError(500, f"generation failed: {error}", type_="server_error") from None
        return {
            "id": completion_id,
            "object": "chat.completion",
            "created": now,
            "model": model_name,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "logprobs": None,
                    "finish_reason": reason,
                }
            ],
            "usage": {
                "prompt_tokens": job.prompt_tokens,
                "completion_tokens": tokens,
                "total_tokens": job.prompt_tokens + tokens,
            },
        }

    async def _events(job: Job, completion_id: str, now: int):
        def chunk(delta: dict, reason=None) -> str:
            data = {
                "id": completion_id,
                "object": "chat.completion.chunk",
                "created": now,
                "model": model_name,
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}],
            }
            return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

        trimmer = Trimmer()
        try:
            yield chunk({"role": "assistant", "content": ""})
            while True:
                item = await job.pieces.get()
                if isinstance(item, Exception):
                    error = ApiError(500, f"generation failed: {item}", type_="server_error")
                    yield f"data: {json.dumps(error.body())}\n\n"
                    break
                if isinstance(item, tuple):
                    yield chunk({}, item[2])
                    break
                text = trimmer.feed(item)
                if text:
                    yield chunk({"content": text})
            yield "data: [DONE]\n\n"
        finally:
            job.cancelled.set()  # a client that went away stops its generation at the next token

    return app
