"""The worker that owns the model behind the API: one at a time, generation in a thread, never on the event loop.

Requests wait in a queue; non-streaming requests with the same decoding settings are answered together by one
batched TunedModel.generate_ids call (up to --max_batch_size), streaming requests one at a time. A job whose
client went away (Job.cancel) is skipped, or its row stops at the next token; a failed generation fails its
own jobs only, and the worker goes on.
"""

import asyncio
from collections import deque
from concurrent.futures import ThreadPoolExecutor

from glmtune.serve.api import Job


class TokenRecorder:
    """A stopping criterion that never stops generation by itself: it keeps the latest ids (to count the
    generated tokens and tell "stop" from "length") and stops a row once its request is cancelled
    (``cancelled``: one threading.Event per row; the other rows of a batch go on)."""

    def __init__(self, cancelled: list):
        self.ids = None
        self.cancelled = cancelled

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        self.ids = input_ids
        stop = [event.is_set() for event in self.cancelled]
        return torch.tensor(stop, dtype=torch.bool, device=input_ids.device)

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
            if job.cancelled.is_set():  # its client went away while it waited
                continue
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
            batch = [j for j in batch if not j.cancelled.is_set()]  # clients gone away
            if batch:
                await loop.run_in_executor(self.executor, self._generate, batch, loop)

    def _generate(self, batch: list, loop):
        tuned = self.tuned
        recorder = TokenRecorder([job.cancelled for job in batch])  # a client gone away stops its row
        try:
            from transformers import StoppingCriteriaList

            rows = [job.prompt_ids for job in batch]
            width = max(map(len, rows))
            texts = tuned.generate_ids(
                rows, stopping_criteria=StoppingCriteriaList([recorder]), **batch[0].generate_kwargs()
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
        recorder = TokenRecorder([job.cancelled])
        try:
            from transformers import StoppingCriteriaList

            width = len(job.prompt_ids)
            for piece in tuned.stream_ids(
                job.prompt_ids, stopping_criteria=StoppingCriteriaList([recorder]), **job.generate_kwargs()
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
