"""Benchmark: latency of a short Chat reply alone vs under load from concurrent users, through the real app.

Starts the app in this process on a free localhost port (embedded model + shipped adapter by default), then:
(1) sends short /chat requests one at a time; (2) starts ``--clients`` concurrent gradio_client users that each send
``--requests`` short questions (Chat base and fine-tuned, and Compare) at once. Prints p50/p95 latency of the short
Chat replies in both phases, their ratio, throughput, and the number of errors. Bounded: every request has a
timeout and the whole run a deadline; traffic goes to 127.0.0.1 only.

    python -m benchmarks.load [--clients 20] [--requests 2] [--max_new_tokens 8] [--base_model embedded]
"""

from __future__ import annotations

import argparse
import statistics
import time
from concurrent.futures import ThreadPoolExecutor, as_completed

from app import model_status
from app.ui.interface import build_app
from pubmedqa import variants
from pubmedqa.config import ModelSettings, ServerSettings
from pubmedqa.data import load_examples
from pubmedqa.engines.transformers_engine import TransformersEngine
from pubmedqa.variants import Variant


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base_model", default="embedded")
    parser.add_argument("--adapter", default=ModelSettings().adapter)
    parser.add_argument("--quantization", default="4bit")
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--requests", type=int, default=2, help="requests per client under load")
    parser.add_argument("--alone", type=int, default=8, help="requests sent one at a time first")
    parser.add_argument("--max_new_tokens", type=int, default=8)
    parser.add_argument("--deadline_s", type=float, default=900.0)
    args = parser.parse_args()

    from gradio_client import Client

    engine = TransformersEngine(ModelSettings(base_model=args.base_model, adapter=args.adapter, quantization=args.quantization))
    engine.load()
    server = ServerSettings(queue_size=max(64, args.clients * args.requests), preload=False)
    demo = build_app(engine, server)
    _, url, _ = demo.launch(server_name="127.0.0.1", server_port=None, prevent_thread_lock=True, quiet=True)
    questions = [ex["question"] for ex in load_examples() + load_examples(key="dev_examples")]
    started = time.monotonic()
    try:
        client = Client(url, verbose=False)

        def chat(question: str, model: str = variants.choice(variants.DEFAULT)) -> float:
            t0 = time.perf_counter()
            client.predict(question=question, model=model, max_new_tokens=args.max_new_tokens, api_name="/chat")
            return time.perf_counter() - t0

        chat(questions[0])  # warm-up
        alone = [chat(questions[i % len(questions)]) for i in range(args.alone)]

        def user(index: int) -> list[tuple[str, float]]:
            own = Client(url, verbose=False)
            results = []
            for r in range(args.requests):
                if time.monotonic() - started > args.deadline_s:
                    break
                question = questions[(index * args.requests + r) % len(questions)]
                kind = ("chat", "chat-tuned", "compare")[(index + r) % 3]
                t0 = time.perf_counter()
                if kind == "compare":
                    own.predict(question=question, max_new_tokens=args.max_new_tokens, api_name="/compare")
                else:
                    tuned = kind == "chat-tuned" and engine.load().adapter_loaded
                    model = variants.choice(Variant.TUNED if tuned else Variant.BASE)
                    own.predict(question=question, model=model, max_new_tokens=args.max_new_tokens, api_name="/chat")
                results.append((kind, time.perf_counter() - t0))
            return results

        loaded: list[tuple[str, float]] = []
        errors: list[str] = []
        t0 = time.perf_counter()
        with ThreadPoolExecutor(args.clients) as pool:
            for future in as_completed([pool.submit(user, i) for i in range(args.clients)]):
                try:
                    loaded += future.result()
                except Exception as exc:  # noqa: BLE001 - counted and shown, the run goes on
                    errors.append(f"{type(exc).__name__}: {exc}")
        wall = time.perf_counter() - t0
    finally:
        demo.close()

    chats = [s for kind, s in loaded if kind != "compare"]
    print(f"model: {model_status.details(engine)}")
    print(f"alone:      {len(alone)} short chat replies, p50 {statistics.median(alone):.2f} s, p95 {_percentile(alone, 0.95):.2f} s")
    print(f"under load: {args.clients} concurrent clients x {args.requests} requests ({len(loaded)} done, "
          f"{len(errors)} errors) in {wall:.1f} s = {len(loaded) / wall:.2f} requests/s")
    if chats:
        p50, p95 = statistics.median(chats), _percentile(chats, 0.95)
        print(f"            chat replies p50 {p50:.2f} s, p95 {p95:.2f} s")
        print(f"ratio under load / alone: p50 {p50 / statistics.median(alone):.1f}x, "
              f"p95 {p95 / _percentile(alone, 0.95):.1f}x")
    for error in errors[:5]:
        print("error:", error)


if __name__ == "__main__":
    main()
