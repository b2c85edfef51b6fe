"""Benchmark: what evidence is worth to a user who does not paste an abstract. The yes/no/maybe decisions on the
official test questions asked with the question only, four ways: no context; the local index's top article as
the context (what the app's automatic search gives; the index holds the question's own abstract, so this is the
best case of a search); the top article above the threshold with the question's own abstract left out of the index
(a question whose article is not indexed: usually no context at all); and the gold abstract (what a user who pastes
it gets). Base and fine-tuned, on the llama.cpp engine with the shipped adapter. Accuracy and macro-F1 of each.

The retrieved and the gold context are both given without the abstract's conclusion (PubMedQA's reasoning-required
setting, as the adapter was trained). Measures only; nothing is chosen on these questions.

    python -m benchmarks.evidence_decisions [--limit 500] [--adapter assets/adapter]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from tqdm.auto import tqdm

from pubmedqa.config import SHIPPED_ADAPTER_DIR, EvidenceSettings, ModelSettings
from pubmedqa.data import SplitSettings, load_records, load_test_ids
from pubmedqa.decisions.options import predicted_decision
from pubmedqa.engines.base import GenerationSettings
from pubmedqa.engines.llama_cpp_engine import LlamaCppEngine
from pubmedqa.evaluation.metrics import decision_metrics
from pubmedqa.evidence import EvidenceSearch
from pubmedqa.prompts import PromptInput
from pubmedqa.variants import Variant


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, default=500, help="Test questions measured (all 500 by default).")
    parser.add_argument("--adapter", default=str(SHIPPED_ADAPTER_DIR))
    args = parser.parse_args(argv)

    data_dir = SplitSettings().data
    records = load_records(data_dir)
    test = [records[pubid] for pubid in load_test_ids(data_dir if Path(data_dir).is_dir() else None)][: args.limit]
    search = EvidenceSearch(EvidenceSettings(evidence="local", evidence_local_data=str(data_dir)))
    started = time.perf_counter()
    index = search.local_index()
    threshold = search.settings.evidence_local_min_score
    retrieved, others = [], []
    for record in tqdm(test, desc="retrieving", unit="question"):
        found = search.search(record.question, k=1)
        retrieved.append(found.articles[0] if found.articles else None)
        other = index.search(record.question, 1, min_score=threshold, exclude=[record.pubid])
        others.append(other[0].article if other else None)
    search_s = time.perf_counter() - started
    own = sum(a is not None and a.pmid == r.pubid for a, r in zip(retrieved, test))
    contexts = {
        "no context": ["" for _ in test],
        "retrieved top-1": [a.context_text(include_conclusion=False) if a else "" for a in retrieved],
        "own left out": [a.context_text(include_conclusion=False) if a else "" for a in others],
        "gold abstract": [r.context for r in test],
    }

    engine = LlamaCppEngine(ModelSettings(adapter=args.adapter, engine="llama.cpp"))
    if not engine.load().adapter_loaded:
        raise SystemExit(f"no adapter loaded from {args.adapter}: {engine.adapter_unavailable_reason()}")
    settings = GenerationSettings()
    gold = [r.final_decision for r in test]
    rows = []
    for condition, texts in contexts.items():
        prompts = [engine.prepare(PromptInput(r.question, c), settings) for r, c in zip(test, texts)]
        for variant in (Variant.BASE, Variant.TUNED):
            scores = []
            for start in tqdm(range(0, len(prompts), 25), desc=f"{condition}, {variant.value}", unit="batch"):
                batch = prompts[start : start + 25]
                scores += engine.score_decisions(batch, [variant] * len(batch))
            metrics = decision_metrics(gold, [predicted_decision(s) for s in scores])
            counts = metrics["predicted_counts"]
            rows.append((condition, variant.value, metrics["accuracy"], metrics["macro_f1"],
                         " / ".join(str(counts.get(o, 0)) for o in ("yes", "no", "maybe"))))

    print(f"{len(test)} official test questions; the local index's top article is the question's own for {own} "
          f"({own / len(test):.1%}), none found for {sum(a is None for a in retrieved)}; with the own abstract left out, an article above the "
          f"threshold for {sum(a is not None for a in others)}; search {search_s:.1f} s in all")
    print(f"{'context':<18}{'model':<12}{'accuracy':>10}{'macro-F1':>10}  predicted yes / no / maybe")
    for condition, variant, accuracy, macro_f1, predicted in rows:
        print(f"{condition:<18}{variant:<12}{accuracy:>10.1%}{macro_f1:>10.1%}  {predicted}")


if __name__ == "__main__":
    main()
