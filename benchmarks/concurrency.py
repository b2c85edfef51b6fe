"""Benchmark: many visitors at once through the app's OpenAI-compatible API (streaming ``/v1/chat/completions``), as
a public Space's visitors would send them.

Starts ``python app.py`` (the embedded model and the shipped adapter, the README's command) from ``--repo`` (this
checkout by default; another one, e.g. a worktree of an older commit, measures that one the same way) on a free
localhost port, then, for questions without and with their abstract (dev questions, ~400 tokens of abstract),
sends the same ``--requests`` requests one at a time and then ``--clients`` (1, 4, 8, 16) at once, fine-tuned and
base half and half, greedy, ``--max_tokens`` each. Prints per level: aggregate completion tokens/s and its ratio to
one at a time, p50/p95 time to first token and to the last, the server's peak resident memory, errors; and how many
answers are identical to the one-at-a-time answers of the same requests. Run it on a quiet machine: another
llama.cpp job on the same cores slows both by up to 10x.

    PUBMEDQA_DATA=../shared/data/pubmedqa python -m benchmarks.concurrency [--repo .] [--clients 1 4 8 16]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx

from pubmedqa.data import SplitSettings
from pubmedqa.gguf.source import gguf_file

MODELS = ("pubmedqa-tuned", "pubmedqa-base")


@dataclass
class Result:
    ttft_s: float
    total_s: float
    text: str
    error: str = ""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


class PeakMemory:
    """The server's peak resident memory while the ``with`` block runs (sampled every 50 ms)."""

    def __init__(self, pid: int):
        self.pid, self.peak = pid, 0.0
        self._stop = threading.Event()

    def __enter__(self) -> PeakMemory:
        self.peak = _rss_mb(self.pid)
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, _rss_mb(self.pid))

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _start_server(repo: Path, port: int, log: Path) -> subprocess.Popen:
    env = {**os.environ, "GRADIO_SERVER_PORT": str(port), "GRADIO_SERVER_NAME": "127.0.0.1",
           "PUBMEDQA_EVIDENCE": "off", "PUBMEDQA_MCP_SERVER": "false"}
    handle = log.open("w")
    return subprocess.Popen([sys.executable, "app.py"], cwd=repo, env=env, stdout=handle, stderr=subprocess.STDOUT)


def _ask(client: httpx.Client, url: str, model: str, question: str, context: str, max_tokens: int) -> Result:
    # The abstract as a system message, the way an OpenAI client passes a document (the app reads it as the context).
    messages = ([{"role": "system", "content": context}] if context else []) + [{"role": "user", "content": question}]
    body = {"model": model, "messages": messages, "max_tokens": max_tokens,
            "temperature": 0, "stream": True}
    started = time.perf_counter()
    first, parts = None, []
    try:
        with client.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=600) as response:
            if response.status_code != 200:
                return Result(0, time.perf_counter() - started, "", f"HTTP {response.status_code}")
            for line in response.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                delta = json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
                if delta and first is None:
                    first = time.perf_counter() - started
                parts.append(delta)
    except httpx.HTTPError as exc:
        return Result(0, time.perf_counter() - started, "", type(exc).__name__)
    total = time.perf_counter() - started
    return Result(first if first is not None else total, total, "".join(parts))


def _wait_ready(client: httpx.Client, url: str, server: subprocess.Popen, deadline_s: float = 300) -> None:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if server.poll() is not None:
            raise SystemExit(f"the server exited ({server.returncode}); see its log")
        try:
            if all(not _ask(client, url, model, "Is this ready?", "", 2).error for model in MODELS):
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise SystemExit("the server was not ready in time")


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", default=".", help="Checkout whose app.py is measured.")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--requests", type=int, default=16, help="Requests per level (at least the most clients).")
    parser.add_argument("--max_tokens", type=int, default=64)
    parser.add_argument("--modes", nargs="+", default=["no abstract", "abstract"], choices=["no abstract", "abstract"])
    args = parser.parse_args()

    import llama_cpp

    vocab = llama_cpp.Llama(model_path=str(gguf_file("embedded")), vocab_only=True, verbose=False)
    count = lambda text: len(vocab.tokenize(text.encode(), add_bos=False)) if text else 0  # noqa: E731
    n = max(args.requests, max(args.clients))
    dev = SplitSettings().load_split().dev[:n]
    repo = Path(args.repo).resolve()
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = Path(f"/tmp/benchmark-concurrency-{port}.log")
    server = _start_server(repo, port, log)
    try:
        with httpx.Client(limits=httpx.Limits(max_connections=256)) as client:
            _wait_ready(client, url, server)
            commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True,
                                    text=True).stdout.strip()
            print(f"{repo} at {commit}: python app.py, embedded model, shipped adapter; {n} dev questions, "
                  f"{args.max_tokens} tokens, greedy, fine-tuned and base alternating; idle RSS "
                  f"{_rss_mb(server.pid):.0f} MB; server log {log}")
            for mode in args.modes:
                jobs = [(MODELS[i % 2], r.question, r.context if mode == "abstract" else "") for i, r in enumerate(dev)]
                if mode == "abstract":
                    words = statistics.mean(len(r.context.split()) for r in dev)
                    print(f"\n## With the abstract (~{words:.0f} words, "
                          f"{statistics.mean(count(r.context) for r in dev):.0f} tokens on average)")
                else:
                    print("\n## Without an abstract")
                run = lambda job: _ask(client, url, *job, args.max_tokens)  # noqa: E731
                with PeakMemory(server.pid) as memory:
                    started = time.perf_counter()
                    alone = [run(job) for job in jobs]
                    alone_s = time.perf_counter() - started
                alone_tokens = sum(count(r.text) for r in alone)
                base_rate = alone_tokens / alone_s
                print(f"one at a time: {alone_tokens} tokens in {alone_s:.1f} s = {base_rate:.1f} tokens/s, "
                      f"p50 TTFT {_percentile([r.ttft_s for r in alone], 0.5):.2f} s, peak RSS {memory.peak:.0f} MB")
                print("| clients at once | tokens/s | × one at a time | TTFT p50 / p95 | last token p50 / p95 | "
                      "peak RSS | errors | identical answers |")
                print("|---|---|---|---|---|---|---|---|")
                for clients in args.clients:
                    with PeakMemory(server.pid) as memory, ThreadPoolExecutor(clients) as pool:
                        started = time.perf_counter()
                        results = list(pool.map(run, jobs))
                        wall = time.perf_counter() - started
                    ok = [r for r in results if not r.error]
                    tokens = sum(count(r.text) for r in ok)
                    same = sum(r.text == a.text for r, a in zip(results, alone) if not r.error)
                    ttft, last = [r.ttft_s for r in ok], [r.total_s for r in ok]
                    rate = tokens / wall
                    print(f"| {clients} | {rate:.1f} | {rate / base_rate:.2f} | {_percentile(ttft, .5):.2f} / "
                          f"{_percentile(ttft, .95):.2f} s | {_percentile(last, .5):.2f} / "
                          f"{_percentile(last, .95):.2f} s | {memory.peak:.0f} MB | {len(results) - len(ok)} | "
                          f"{same}/{len(ok)} |", flush=True)
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()


if __name__ == "__main__":
    main()
