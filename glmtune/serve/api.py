"""The OpenAI-compatible chat API's requests: what they may hold and how they are checked.

* messages: optional system (or developer) messages first, then user/assistant turns alternating, the last
  one from the user. Earlier user/assistant pairs become the history; the system messages (joined by a
  blank line) go where training puts a record's system text (glmtune.prompt: the format's system slot, or
  "{system}\\n\\n{first user message}" in formats without one).
  Content is a string or a list of {"type": "text", "text": ...} parts.
* max_tokens (or max_completion_tokens; default 128), temperature, top_p, stream, n (only 1). Decoding is
  greedy unless temperature > 0, which samples with that temperature and top_p (below 1e-5 it decodes
  greedily: sampling at such a temperature is greedy). stop is refused unless empty. "model" is accepted
  with any value; replies carry this server's --model_name. Other OpenAI fields (seed, user, ...) are
  ignored.
* A client that goes away (closes the connection) cancels its request: it leaves the queue, or its
  generation stops at the next token (the other rows of its batch go on).
* A prompt longer than --max_source_length tokens is refused (400, code context_length_exceeded) rather
  than truncated. usage counts the prompt tokens and the generated tokens (the end-of-sequence token
  included when the model stopped by itself, finish_reason "stop"; "length" when max_tokens ran out).
"""

import asyncio
import json
import threading
from dataclasses import dataclass, field

from glmtune.serve import DEFAULT_MAX_NEW_TOKENS

SYSTEM_ROLES = ("system", "developer")
# Below this temperature, sampling is greedy decoding (as in vLLM); dividing the logits by, say, 1e-300 would
# overflow them to inf and fail the generation.
MIN_SAMPLING_TEMPERATURE = 1e-5


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
    prompt_ids: list  # encoded once, here; the worker generates from these ids
    max_new_tokens: int
    temperature: float
    top_p: float
    stream: bool
    future: asyncio.Future = None  # non-streaming: resolved with (text, completion_tokens, finish_reason)
    pieces: asyncio.Queue = (
        None  # streaming: text pieces, then ("end", completion_tokens, finish_reason) or an exception
    )
    cancelled: threading.Event = field(default_factory=threading.Event)  # set: the client went away

    def cancel(self):
        """The client went away: the worker skips the job, or stops its generation at the next token."""
        self.cancelled.set()
        if self.future is not None:
            self.future.cancel()

    def generate_kwargs(self) -> dict:
        if self.temperature >= MIN_SAMPLING_TEMPERATURE:
            return {
                "max_new_tokens": self.max_new_tokens,
                "do_sample": True,
                "temperature": self.temperature,
                "top_p": self.top_p,
            }
        return {"max_new_tokens": self.max_new_tokens, "do_sample": False}

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)

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
    """OpenAI messages -> (query, history as [[user, assistant], ...], system); see the module docstring."""
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
    history = [[turns[i], turns[i + 1]] for i in range(0, len(turns) - 1, 2)]
    return turns[-1], history, "\n\n".join(system)


def parse_request(body, tuned, max_source_length: int) -> Job:
    if not isinstance(body, dict):
        raise invalid("the request body must be a JSON object")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise invalid("'model' must be a string", "model")
    query, history, system = parse_messages(body.get("messages"))
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
    max_tokens = _number(body, name, DEFAULT_MAX_NEW_TOKENS, 1, None, integer=True)
    temperature = _number(body, "temperature", 0.0, 0, 2)
    top_p = _number(body, "top_p", 1.0, 0, 1, low_open=True)
    prompt_ids = tuned.prompts.full_ids(query, history, system)  # untruncated: a prompt too long is refused, not cut
    tokens = len(prompt_ids)
    if tokens > max_source_length:
        raise invalid(
            f"This model's maximum context length is {max_source_length} tokens, but the messages have "
            f"{tokens} tokens. Shorten the messages (or start the server with a larger --max_source_length).",
            "messages",
            "context_length_exceeded",
        )
    return Job(query, history, prompt_ids, max_tokens, float(temperature), float(top_p), bool(stream))
