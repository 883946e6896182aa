"""scripts/api_server.py: an OpenAI-compatible server, checked with the official openai client against a subprocess."""

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import REPO, TOY_DEV, TOY_TRAIN

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

KEY = "test-key"
MAX_SOURCE_LENGTH = 64
TOKENS = 8
QUERIES = [json.loads(line)["content"] for line in TOY_DEV.open(encoding="utf-8")][:8]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, *flags, env=None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            [sys.executable, str(REPO / "scripts" / "api_server.py"), "--port", str(self.port), *map(str, flags)],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "OMP_NUM_THREADS": "2", **(env or {})},
        )

    def wait(self, key=None, timeout=60):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"the server exited with {self.process.returncode}:\n{self.process.stdout.read()[-3000:]}")
            try:
                status, _ = request(self.url + "/v1/models", key=key)
                if status == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.3)
        self.stop()
        pytest.fail(f"the server did not answer within {timeout} s:\n{self.process.stdout.read()[-3000:]}")

    def client(self, key=KEY):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=60)

    def stop(self):
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def request(url, body=None, key=KEY, raw=None):
    """(status, parsed JSON body) of a GET (no body) or POST, without the openai client."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=data, headers=headers), timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


HISTORY = [["系统提示\n\n" + QUERIES[1], "好的。"]]  # what the ptuning test's system + first two messages become


@pytest.fixture(scope="module")
def servers(tiny_model_dir, lora_checkpoint, ptuning_checkpoint):
    """Both servers start at once (their imports overlap with each other and with the in-process answers)."""
    from glmtune.serve.tuned import load_tuned

    lora = Server(
        "--model_name_or_path",
        tiny_model_dir,
        "--checkpoint",
        lora_checkpoint,
        "--max_source_length",
        MAX_SOURCE_LENGTH,
        "--max_batch_size",
        8,
        env={"GLMTUNE_API_KEY": KEY},
    )
    ptuning = Server(
        "--model_name_or_path",
        tiny_model_dir,
        "--checkpoint",
        ptuning_checkpoint,
        "--max_source_length",
        256,
        "--model_name",
        "pt",
    )
    try:
        tuned = load_tuned(str(tiny_model_dir), str(lora_checkpoint), max_source_length=MAX_SOURCE_LENGTH)
        lora.expected = [tuned.generate([query], max_new_tokens=TOKENS)[0] for query in QUERIES]
        tuned = load_tuned(str(tiny_model_dir), str(ptuning_checkpoint), max_source_length=256)
        ptuning.expected = [
            tuned.generate([QUERIES[0]], max_new_tokens=TOKENS)[0],
            tuned.generate([QUERIES[2]], [HISTORY], max_new_tokens=TOKENS)[0],
        ]
        yield {"lora": lora.wait(KEY), "ptuning": ptuning.wait()}
    finally:
        lora.stop()
        ptuning.stop()


@pytest.fixture()
def lora_server(servers):
    return servers["lora"]


@pytest.fixture()
def lora_expected(servers):
    return servers["lora"].expected


def chat(client, query, max_tokens=TOKENS, **kwargs):
    return client.chat.completions.create(
        model="any", messages=[{"role": "user", "content": query}], max_tokens=max_tokens, **kwargs
    )


def test_plain_and_streamed_completions_match_in_process_generation(lora_server, lora_expected, lora_checkpoint):
    client = lora_server.client()
    reply = chat(client, QUERIES[0])
    assert reply.object == "chat.completion" and reply.id.startswith("chatcmpl-")
    assert reply.model == lora_checkpoint.name
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == lora_expected[0]
    assert reply.choices[0].finish_reason in ("stop", "length")
    usage = reply.usage
    assert usage.prompt_tokens > 0 and 0 < usage.completion_tokens <= TOKENS
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert (reply.choices[0].finish_reason == "length") == (usage.completion_tokens == TOKENS)

    chunks = list(chat(client, QUERIES[0], stream=True))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == lora_expected[0]
    assert chunks[-1].choices[0].finish_reason == reply.choices[0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])


def test_models_lists_the_served_model(lora_server, lora_checkpoint):
    models = lora_server.client().models.list()
    assert [m.id for m in models.data] == [lora_checkpoint.name]
    assert models.data[0].object == "model"


def test_concurrent_clients_each_get_their_own_answer(lora_server, lora_expected):
    client = lora_server.client()
    order = [7, 2, 5, 0, 3, 6, 1, 4]  # each thread its own query, out of order

    def ask(i):  # one of them streams, in the middle of the others
        if i == 3:
            return "".join(c.choices[0].delta.content or "" for c in chat(client, QUERIES[i], stream=True))
        return chat(client, QUERIES[i]).choices[0].message.content

    with ThreadPoolExecutor(len(order)) as pool:
        replies = dict(zip(order, pool.map(ask, order)))
    assert [replies[i] for i in range(len(order))] == lora_expected


@pytest.mark.parametrize(
    "raw, param",
    [
        (b"{not json", None),
        (json.dumps({"model": "m"}).encode(), "messages"),
        (json.dumps({"model": "m", "messages": []}).encode(), "messages"),
        (
            json.dumps(
                {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
            ).encode(),
            "messages",
        ),
        (json.dumps({"messages": [{"role": "tool", "content": "a"}]}).encode(), "messages[0].role"),
        (json.dumps({"messages": [{"role": "user", "content": 3}]}).encode(), "messages[0].content"),
        (json.dumps({"messages": [{"role": "user", "content": "a"}], "n": 2}).encode(), "n"),
        (json.dumps({"messages": [{"role": "user", "content": "a"}], "max_tokens": "8"}).encode(), "max_tokens"),
        (json.dumps({"messages": [{"role": "user", "content": "a"}], "stop": ["\n"]}).encode(), "stop"),
    ],
)
def test_malformed_requests_get_openai_style_errors(lora_server, raw, param):
    status, body = request(lora_server.url + "/v1/chat/completions", raw=raw)
    assert status == 400
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["type"] == "invalid_request_error" and body["error"]["message"]
    assert body["error"]["param"] == param


def test_a_prompt_over_max_source_length_is_refused(lora_server):
    with pytest.raises(openai.BadRequestError) as caught:
        chat(lora_server.client(), "长" * 200)
    error = caught.value.body
    assert error["code"] == "context_length_exceeded"
    assert f"maximum context length is {MAX_SOURCE_LENGTH} tokens" in error["message"]
    tokens = int(error["message"].split("messages have ")[1].split()[0])
    assert tokens > MAX_SOURCE_LENGTH


def test_the_api_key_is_required(lora_server):
    for key in (None, "wrong"):
        status, body = request(lora_server.url + "/v1/models", key=key)
        assert status == 401 and body["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        chat(lora_server.client("wrong"), QUERIES[0])
    assert chat(lora_server.client(KEY), QUERIES[0]).choices[0].message.content


def test_ptuning_checkpoint_with_history_and_system_message(servers):
    server = servers["ptuning"]
    client = server.client("any key: this server has none")
    reply = chat(client, QUERIES[0])
    assert (reply.model, reply.choices[0].message.content) == ("pt", server.expected[0])
    messages = [
        {"role": "system", "content": "系统提示"},
        {"role": "user", "content": QUERIES[1]},
        {"role": "assistant", "content": "好的。"},
        {"role": "user", "content": QUERIES[2]},
    ]
    reply = client.chat.completions.create(model="pt", messages=messages, max_tokens=TOKENS)
    assert reply.choices[0].message.content == server.expected[1]


# ----------------------------------------------------------------------------- under load

CLIENTS, ROUNDS, LOAD_TOKENS = 64, 3, 16
RSS_MARGIN_MIB = 8


@pytest.fixture(scope="module")
def load_server(tmp_path_factory):
    """A server of the tiny GLM with random weights drawn wider than usual (std 0.1, not 0.02), so that its
    greedy answers differ from prompt to prompt: with the session's tiny model every prompt gets the same
    answer, and a client given another client's answer would not show. Also, it rarely stops by itself, so
    a client that goes away and whose generation went on would hold the worker for seconds."""
    from glmtune.serve.tuned import load_tuned
    from scripts import build_tiny_model as tiny
    from scripts.api_load import prompts

    model = tmp_path_factory.mktemp("tiny-glm-wide")
    tiny.build(str(TOY_TRAIN), str(model), steps=0, num_hidden_layers=2, initializer_range=0.1)
    server = Server("--model_name_or_path", model, "--max_source_length", MAX_SOURCE_LENGTH, "--max_batch_size", 8)
    try:
        server.queries = prompts(CLIENTS)
        tuned = load_tuned(str(model), max_source_length=MAX_SOURCE_LENGTH)
        server.expected = [tuned.generate([q], max_new_tokens=LOAD_TOKENS)[0] for q in server.queries]
        yield server.wait()
    finally:
        server.stop()


def test_64_concurrent_clients_some_going_away_get_their_own_answers_without_leaks(load_server):
    """3 rounds of 64 clients at once, half streaming; 8 streaming clients hang up after their first text,
    4 others give up after 0.5 s (all 12 asked for 10000 tokens); every other client gets its own greedy
    answer, a request after each round is answered, and the server process, measured from /proc, keeps its
    memory, threads and open files from round 1 to round 3."""
    from scripts.api_load import process_stats, settled_stats, storm

    queries, expected = load_server.queries, load_server.expected
    assert len(set(expected)) == CLIENTS  # a mix-up would show
    idle, rounds = process_stats(load_server.process.pid), []
    for _ in range(ROUNDS):
        # The clients wait at most 30 s: had a generation gone on after its client left (10000 tokens, more
        # than a minute here), the clients queued behind it would time out.
        result = asyncio.run(storm(load_server.url, None, queries, expected, LOAD_TOKENS, timeout=30))
        result.update(settled_stats(load_server.process.pid, idle))
        rounds.append(result)
        assert result["wrong"] == [] and result["answered"] == CLIENTS - 12 and result["left"] == 12
        assert result["probe_ok"]
    first, last = rounds[0], rounds[-1]
    assert last["rss_mib"] - first["rss_mib"] <= RSS_MARGIN_MIB, [r["rss_mib"] for r in rounds]
    assert (last["threads"], last["fds"]) == (first["threads"], first["fds"]), rounds


def test_a_tiny_temperature_decodes_greedily(load_server):
    """Sampling at temperature 1e-300 divides the logits into inf (generation fails); it is greedy decoding."""
    client = load_server.client()
    for stream in (False, True):
        reply = chat(client, load_server.queries[0], max_tokens=LOAD_TOKENS, temperature=1e-300, stream=stream)
        text = "".join(c.choices[0].delta.content or "" for c in reply) if stream else reply.choices[0].message.content
        assert text == load_server.expected[0]


def test_system_messages_go_where_training_puts_a_system_text(tokenizer):
    """The prompt of a request is the one training builds for a record with that system text."""
    from test_prompt import CHAT_TEMPLATE

    from glmtune.encoding import PromptEncoder
    from glmtune.prompt import PromptFormat
    from glmtune.serve.api import parse_messages

    messages = [
        {"role": "system", "content": "S1"},
        {"role": "developer", "content": "S2"},
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "q2"},
    ]
    query, history, system = parse_messages(messages)
    assert (query, history, system) == ("q2", [["q1", "a1"]], "S1\n\nS2")
    chat = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    chat.chat_template = CHAT_TEMPLATE
    ids = PromptEncoder(chat, PromptFormat("chat_template", chat), 1024).full_ids(query, history, system)
    assert chat.decode(ids) == "<|system|>\nS1\n\nS2\n<|user|>\nq1\n<|assistant|>\na1\n<|user|>\nq2\n<|assistant|>\n"


def test_a_bad_checkpoint_stops_the_server_with_exit_status_2(tiny_model_dir, tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "api_server.py"),
            "--model_name_or_path",
            str(tiny_model_dir),
            "--checkpoint",
            str(tmp_path / "missing"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "error: --checkpoint" in result.stderr and "no such folder" in result.stderr
