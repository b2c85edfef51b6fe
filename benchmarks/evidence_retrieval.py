"""Benchmark: evidence retrieval (pubmedqa.evidence). Over the local BM25 index of the 1,000 PubMedQA abstracts,
for each question of a split: recall@1 and recall@5 of the question's own abstract (raw BM25, and as the app gets
it, through the score threshold evidence_local_min_score); then, with its own abstract removed from the index, how
often any abstract is still returned (score above zero, and above the threshold: what an off-topic question would
get); and the search latency. Then the PubMed path's latency against the fake E-utilities server of the tests with
a delay injected into every response (the network), under NCBI's rate limit.

Measures only. The defaults (threshold, BM25 parameters, stopwords, re-ranking off) were chosen on the 500 non-test
questions (``--split train_dev``); the official test questions (``--split test``, the default) are never used to
choose anything.

    python -m benchmarks.evidence_retrieval [--split test|train_dev] [--rerank] [--latency 0.3] [--pubmed_queries 20]
"""

from __future__ import annotations

import argparse
import html
import time
from pathlib import Path

import numpy as np

from pubmedqa.config import EvidenceSettings
from pubmedqa.data import SplitSettings, load_records, load_test_ids
from pubmedqa.evidence import EvidenceSearch
from tests.fake_eutils import FakeEutils, pubmed_article


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def _fake_store(records) -> dict[str, str]:
    """The fake server's articles: PubMedQA records as efetch XML (structured abstracts), for realistic sizes."""
    store = {}
    for record in records:
        sections = "".join(
            f'<AbstractText Label="{html.escape(label)}" NlmCategory="{html.escape(label)}">{html.escape(text)}'
            "</AbstractText>" for label, text in zip(record.context_labels, record.contexts))
        sections += (f'<AbstractText Label="CONCLUSIONS" NlmCategory="CONCLUSIONS">{html.escape(record.long_answer)}'
                     "</AbstractText>")
        store[record.pubid] = pubmed_article(record.pubid, html.escape(record.question), sections)
    return store


def local_benchmark(args, records, pubids: list[str]) -> None:
    settings = EvidenceSettings(evidence="local", evidence_local_data=args.data, evidence_rerank=args.rerank,
                                evidence_cache_size=0)
    evidence = EvidenceSearch(settings)
    start = time.perf_counter()
    index = evidence.local_index()
    build = time.perf_counter() - start
    threshold = settings.evidence_local_min_score

    at1 = at5 = kept1 = kept5 = leak_any = leak_threshold = 0
    latencies = []
    for pubid in pubids:
        question = records[pubid].question
        raw = [hit.article.pmid for hit in index.search(question, 5)]
        at1 += bool(raw) and raw[0] == pubid
        at5 += pubid in raw
        begin = time.perf_counter()
        result = evidence.search(question, k=5)  # what the app gets: threshold (and re-ranking when on)
        latencies.append(time.perf_counter() - begin)
        got = [a.pmid for a in result.articles]
        kept1 += bool(got) and got[0] == pubid
        kept5 += pubid in got
        leak_any += bool(index.search(question, 1, exclude=[pubid]))
        leak_threshold += bool(index.search(question, 1, min_score=threshold, exclude=[pubid]))

    n = len(pubids)
    how = "threshold, re-ranked" if args.rerank else "threshold"
    print(f"\nLocal index: {index.description}, built in {build:.2f} s; {n} questions ({args.split}); "
          f"threshold evidence_local_min_score={threshold}; re-rank {'on' if args.rerank else 'off'}")
    rows = [
        ("recall@1, raw BM25", f"{100 * at1 / n:.1f} %"),
        ("recall@5, raw BM25", f"{100 * at5 / n:.1f} %"),
        (f"recall@1, as the app gets it ({how})", f"{100 * kept1 / n:.1f} %"),
        (f"recall@5, as the app gets it ({how})", f"{100 * kept5 / n:.1f} %"),
        ("own abstract removed: any abstract scored > 0", f"{100 * leak_any / n:.1f} %"),
        (f"own abstract removed: any abstract above the threshold {threshold}", f"{100 * leak_threshold / n:.1f} %"),
        ("search latency p50", f"{1000 * _percentile(latencies, 50):.2f} ms"),
        ("search latency p95", f"{1000 * _percentile(latencies, 95):.2f} ms"),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"  {name:<{width}}  {value:>9}")


def pubmed_benchmark(args, records, pubids: list[str]) -> None:
    questions = [records[pubid].question for pubid in pubids[: args.pubmed_queries]]
    hits = pubids[: max(10, 2 * args.k)]
    with FakeEutils(articles=_fake_store(records[p] for p in hits), hits=hits, latency=args.latency) as server:
        settings = EvidenceSettings(evidence="pubmed", evidence_base_url=server.url, evidence_k=args.k)
        evidence = EvidenceSearch(settings)
        latencies = []
        for question in questions:
            begin = time.perf_counter()
            result = evidence.search(question)
            latencies.append(time.perf_counter() - begin)
            assert result.source == "pubmed" and len(result.articles) == args.k, result.message
        begin = time.perf_counter()
        evidence.search(questions[0])
        cached = time.perf_counter() - begin
        n_requests = len(server.requests)

        auto = EvidenceSearch(EvidenceSettings(evidence="auto", evidence_base_url=server.url, evidence_k=args.k,
                                               evidence_local_data=args.data))
        begin = time.perf_counter()
        auto.search(questions[0])
        auto_first = time.perf_counter() - begin

    print(f"\nPubMed path: fake E-utilities with {1000 * args.latency:.0f} ms added to each response, "
          f"{len(questions)} distinct questions, k={args.k}, no API key (3 requests/s)")
    rows = [
        ("requests per question (esearch + efetch)", f"{n_requests / len(questions):.1f}"),
        ("search latency p50", f"{1000 * _percentile(latencies, 50):.0f} ms"),
        ("search latency p95", f"{1000 * _percentile(latencies, 95):.0f} ms"),
        ("repeated question (cache)", f"{1000 * cached:.2f} ms"),
        ("'auto', first question (+ the reachability check)", f"{1000 * auto_first:.0f} ms"),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"  {name:<{width}}  {value:>9}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--split", choices=("test", "train_dev"), default="test",
                        help="'test': the 500 official test questions (measuring only); 'train_dev': the other 500.")
    parser.add_argument("--data", default=SplitSettings().data,
                        help="Folder with ori_pqal.json and test_ground_truth.json.")
    parser.add_argument("--rerank", action="store_true", help="Also re-rank with the offline MiniLM model.")
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--latency", type=float, default=0.3, help="Seconds added to each fake PubMed response.")
    parser.add_argument("--pubmed_queries", type=int, default=20)
    args = parser.parse_args()

    records = load_records(args.data)
    test_ids = load_test_ids(args.data if Path(args.data).is_dir() else None)
    pubids = test_ids if args.split == "test" else sorted(set(records) - set(test_ids))
    local_benchmark(args, records, pubids)
    pubmed_benchmark(args, records, pubids)


if __name__ == "__main__":
    main()
