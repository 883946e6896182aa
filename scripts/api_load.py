"""The API server under load: many concurrent clients, half of them streaming, some going away mid-answer,
in rounds; every answer is checked against in-process generation, and the server's memory across rounds.

    python scripts/api_load.py                      # serves the embedded tiny model: 64 clients, 3 rounds
    python scripts/api_load.py --model_name_or_path MODEL --checkpoint output/adgen-toy-lora --clients 32

It starts scripts/api_server.py with the model options given here and loads the same model in this process
for the expected answers (greedy TunedModel.generate, one prompt at a time). Each round, --clients clients
ask at once, each its own prompt (distinct contents of data/adgen-toy), every other one streaming:
--hangups of the streaming ones ask for --long_tokens tokens and close the connection after their first
piece of text; --give_ups of the others ask for as many and give up waiting after --give_up_after seconds;
the rest ask for --max_tokens tokens and must get exactly the expected answer. Then one more request must be
answered (the worker lives on), and the server process is measured from outside (/proc/<pid>/status and
fd/): resident memory, threads, open files. Exit status 1 when an answer is wrong or missing, or when the
RSS after the last round exceeds the first round's by more than --rss_margin_mib.

Needs the openai client and the server's extras (pip install -r requirements-demo.txt).
tests/test_api_server.py runs the same rounds (``storm``) against its own server.
"""

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = [os.path.join(REPO, "data", "adgen-toy", name) for name in ("dev.json", "train.json")]


def prompts(count: int) -> list:
    """``count`` distinct prompts: the contents of the toy dev set, then of the train set."""
    found = {}
    for path in DATA:
        with open(path, encoding="utf-8") as f:
            for line in f:
                found.setdefault(json.loads(line)["content"], None)
                if len(found) == count:
                    return list(found)
    raise ValueError(f"only {len(found)} distinct prompts in {DATA}")


def process_stats(pid: int) -> dict:
    """A process measured from outside: resident memory (VmRSS, MiB), threads, open file descriptors."""
    stats = {"fds": len(os.listdir(f"/proc/{pid}/fd"))}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                stats["rss_mib"] = int(line.split()[1]) / 1024
            elif line.startswith("Threads:"):
                stats["threads"] = int(line.split()[1])
    return stats


async def _ask(client, query: str, max_tokens: int, stream: bool, leave_after=None):
    """The answer's text; None for a client that goes away: ``leave_after`` seconds without an answer
    (non-streaming), or after the first piece of text (streaming, ``leave_after`` set)."""
    import openai

    messages = [{"role": "user", "content": query}]
    if not stream:
        try:
            reply = await client.chat.completions.create(
                model="any", messages=messages, max_tokens=max_tokens, timeout=leave_after or client.timeout
            )
        except openai.APITimeoutError:
            if leave_after:
                return None  # the connection is closed: the server sees the client go
            raise
        return reply.choices[0].message.content
    chunks = await client.chat.completions.create(model="any", messages=messages, max_tokens=max_tokens, stream=True)
    text = ""
    async for chunk in chunks:
        text += (chunk.choices[0].delta.content or "") if chunk.choices else ""
        if leave_after and text:
            await chunks.close()  # drops the connection in the middle of the answer
            return None
    return text


async def storm(
    url: str,
    key,
    queries: list,
    expected: list,
    max_tokens: int = 16,
    hangups: int = 8,
    give_ups: int = 4,
    long_tokens: int = 10000,
    give_up_after: float = 0.5,
    timeout: float = 60,
) -> dict:
    """One round: a client per query, all at once; the odd-numbered ones stream. The first ``hangups``
    streaming clients and the first ``give_ups`` others ask for ``long_tokens`` tokens and go away (see
    _ask); every other client must get its ``expected`` answer. Then one more (non-streaming) request.
    Returns {seconds, answered (right answers), left (clients that went away), wrong: [(client, got,
    expected)], probe_ok}."""
    import openai

    leaving = set(range(1, len(queries), 2)[:hangups]) | set(range(0, len(queries), 2)[:give_ups])
    async with openai.AsyncOpenAI(
        base_url=url + "/v1", api_key=key or "none", max_retries=0, timeout=timeout
    ) as client:
        start = time.perf_counter()
        results = await asyncio.gather(
            *(
                _ask(client, q, long_tokens, i % 2 == 1, give_up_after)
                if i in leaving
                else _ask(client, q, max_tokens, i % 2 == 1)
                for i, q in enumerate(queries)
            ),
            return_exceptions=True,
        )
        seconds = time.perf_counter() - start
        try:
            probe = await _ask(client, queries[-1], max_tokens, stream=False)
        except openai.OpenAIError as error:
            probe = error
    # A client that means to go away may get its whole answer first (a model that stops early): not an error.
    wrong = [
        (i, got if isinstance(got, str) else repr(got), want)
        for i, (got, want) in enumerate(zip(results, expected))
        if (isinstance(got, BaseException) if i in leaving else got != want)
    ]
    return {
        "seconds": seconds,
        "answered": sum(i not in leaving and got == want for i, (got, want) in enumerate(zip(results, expected))),
        "left": sum(i in leaving and got is None for i, got in enumerate(results)),
        "wrong": wrong,
        "probe_ok": probe == expected[-1],
    }


def settled_stats(pid: int, idle: dict, seconds: float = 5) -> dict:
    """process_stats once the clients' connections are closed on the server's side too (its open files back
    to ``idle``'s, the process_stats of the server before the clients came), or after ``seconds``."""
    deadline = time.time() + seconds
    while True:
        stats = process_stats(pid)
        if stats["fds"] <= idle["fds"] or time.time() > deadline:
            return stats
        time.sleep(0.1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(url: str, process, timeout: float = 300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            sys.exit(f"the server exited with status {process.returncode}")
        try:
            with urllib.request.urlopen(url + "/v1/models", timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    sys.exit(f"the server did not answer within {timeout:.0f} s")


def main(argv=None):
    from glmtune.serve import options

    parser = options.parser(__doc__.split("\n\n")[0])
    load = parser.add_argument_group("load")
    load.add_argument("--clients", type=int, default=64, help="concurrent clients per round")
    load.add_argument("--hangups", type=int, default=8, help="streaming clients that hang up mid-answer")
    load.add_argument("--give_ups", type=int, default=4, help="non-streaming clients that give up waiting")
    load.add_argument("--give_up_after", type=float, default=0.5, help="seconds")
    load.add_argument("--long_tokens", type=int, default=10000, help="tokens the clients that go away ask for")
    load.add_argument("--max_tokens", type=int, default=16, help="tokens the other clients ask for")
    load.add_argument("--rounds", type=int, default=3)
    load.add_argument("--max_batch_size", type=int, default=8, help="passed to the server")
    load.add_argument("--rss_margin_mib", type=float, default=8.0)
    args = parser.parse_args(argv)
    if not (0 <= args.hangups <= args.clients // 2 and 0 <= args.give_ups < (args.clients + 1) // 2):
        parser.error("--hangups and --give_ups must leave clients that stay, of both kinds")

    flags = ["--model_name_or_path", args.model_name_or_path, "--torch_dtype", args.torch_dtype]
    flags += ["--checkpoint", args.checkpoint] if args.checkpoint else []
    flags += ["--quantization_bit", str(args.quantization_bit)] if args.quantization_bit else []
    flags += ["--prompt_template", args.prompt_template, "--source_prefix", args.source_prefix]
    flags += ["--max_source_length", str(args.max_source_length), "--max_batch_size", str(args.max_batch_size)]
    flags += ["--trust_remote_code"] if args.trust_remote_code else []
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [sys.executable, os.path.join(REPO, "scripts", "api_server.py"), *flags, "--port", str(port)],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        queries = prompts(args.clients)
        tuned = options.load(args)  # while the server starts
        expected = [tuned.generate([q], max_new_tokens=args.max_tokens)[0] for q in queries]
        del tuned
        _wait(url, server)
        idle, rounds = process_stats(server.pid), []
        for number in range(1, args.rounds + 1):
            result = asyncio.run(
                storm(
                    url,
                    None,
                    queries,
                    expected,
                    args.max_tokens,
                    args.hangups,
                    args.give_ups,
                    args.long_tokens,
                    args.give_up_after,
                )
            )
            result.update(settled_stats(server.pid, idle))
            rounds.append(result)
            print(
                f"round {number}: {args.clients} clients in {result['seconds']:.2f} s, {result['answered']} "
                f"answers right ({result['answered'] / result['seconds']:.1f}/s), {len(result['wrong'])} wrong, "
                f"{result['left']} went away; next request {'answered' if result['probe_ok'] else 'FAILED'}; "
                f"server: RSS {result['rss_mib']:.1f} MiB, {result['threads']} threads, {result['fds']} open files",
                flush=True,
            )
            for client, got, want in result["wrong"]:
                print(f"  client {client}: got {got!r}, expected {want!r}", flush=True)
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
    first, last = rounds[0], rounds[-1]
    growth = last["rss_mib"] - first["rss_mib"]
    ok = all(not r["wrong"] and r["probe_ok"] for r in rounds) and growth <= args.rss_margin_mib
    answered, seconds = sum(r["answered"] for r in rounds), sum(r["seconds"] for r in rounds)
    print(
        f"{'OK' if ok else 'FAILED'}: {args.clients} concurrent clients ({args.clients // 2} streaming, "
        f"{args.hangups} hanging up, {args.give_ups} giving up), {args.rounds} rounds: {answered} answers, "
        f"{answered / seconds:.1f}/s, {len(set(expected))} distinct; RSS {first['rss_mib']:.1f} -> "
        f"{last['rss_mib']:.1f} MiB ({growth:+.1f}), threads {first['threads']} -> {last['threads']}, "
        f"open files {first['fds']} -> {last['fds']}"
    )
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
