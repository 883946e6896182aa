"""The OpenAI-compatible chat API (FastAPI): GET /v1/models, POST /v1/chat/completions, with and without
streaming. Needs fastapi (requirements-demo.txt); nothing outside glmtune.serve imports it. What requests may
hold: glmtune.serve.api; how they are answered: glmtune.serve.worker.
"""

import asyncio
import hmac
import json
import time
import uuid

from glmtune.serve.api import ApiError, Job, invalid, parse_request
from glmtune.serve.worker import Trimmer, Worker


def create_app(tuned, model_name: str, api_key=None, max_batch_size: int = 8, max_source_length: int | None = None):
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    max_source_length = max_source_length or tuned.max_source_length
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
            answer = await _answer(job, request)
        except asyncio.CancelledError:  # the server stops
            job.cancel()
            raise
        except Exception as error:  # noqa: BLE001
            raise ApiError(500, f"generation failed: {error}", type_="server_error") from None
        if answer is None:  # the client went away (its job is cancelled): nobody reads this
            return Response(status_code=499)  # nginx's "client closed request"
        text, tokens, reason = answer
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
            job.cancel()  # a client that went away stops its generation at the next token

    return app


async def _answer(job: Job, request):
    """The job's (text, completion_tokens, finish_reason); None, with the job cancelled, when the client goes
    away first. uvicorn does not cancel a handler whose client disconnects, so this listens: the body has
    been read, and the next ASGI message is the disconnect."""
    gone = asyncio.ensure_future(_disconnect(request))
    try:
        await asyncio.wait([job.future, gone], return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if not job.future.done():
        job.cancel()
        return None
    return job.future.result()


async def _disconnect(request):
    while (await request.receive())["type"] != "http.disconnect":
        pass
