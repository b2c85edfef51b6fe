"""Two evaluation runs side by side (the Evaluation tab's "Compare two runs"): one variant's figures in each, the
difference on the questions both answered with its paired test, and the questions whose decision flipped from wrong
to right or back (e.g. two adapters, or the same adapter on two engines)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import gradio as gr
import numpy as np
import pandas as pd

from app.eval_runs import RunCatalogue, UnknownRunError
from app.literal_text import literal_markdown
from pubmedqa import variants
from pubmedqa.evaluation.results import ResultsError, RunResults, load_results
from pubmedqa.evaluation.significance import (
    PairedTest,
    accuracy,
    from_code,
    macro_f1,
    mcnemar,
    paired_bootstrap,
    to_codes,
)

#: Which answers of each run to compare: the variant's id (as the page names it) -> its key in run folders.
VARIANT_KEYS = {variants.choice(variant): names.results_key for variant, names in variants.NAMES.items()}
FLIP_ROWS = 200  # the flips table shows at most this many questions (counts are over all)


@dataclass(frozen=True)
class RunPair:
    """One variant's answers in two runs, on the questions both answered (matched by PubMed id)."""

    ids: list[str]
    gold: np.ndarray
    first: np.ndarray  # decision codes
    second: np.ndarray
    questions: list[str]

    def tests(self) -> list[PairedTest]:
        b, c, p = mcnemar(self.first == self.gold, self.second == self.gold)
        spread = paired_bootstrap((self.gold, self.first), (self.gold, self.second), accuracy, "accuracy")
        f1 = paired_bootstrap((self.gold, self.first), (self.gold, self.second), macro_f1, "macro-F1")
        return [PairedTest("accuracy", spread.difference, p, "McNemar (exact)"), f1]


def pair_runs(first: RunResults, second: RunResults, key: str) -> RunPair | None:
    """The questions both runs answered with ``key``'s variant, in the first run's order; None when there are none."""
    def decisions(run: RunResults) -> dict[str, dict[str, Any]]:
        return {str(e.get("id")): e for e in run.examples if isinstance(e.get(key), dict)}

    a, b = decisions(first), decisions(second)
    ids = [i for i in a if i in b]
    if not ids:
        return None
    return RunPair(ids, to_codes([str(a[i].get("gold")) for i in ids]),
                   to_codes([str(a[i][key].get("decision")) for i in ids]),
                   to_codes([str(b[i][key].get("decision")) for i in ids]),
                   [str(a[i].get("question", "")) for i in ids])


def flips_frame(pair: RunPair, first_label: str, second_label: str) -> pd.DataFrame:
    """The questions whose decision is right in one run and wrong in the other."""
    rows = []
    for at, pmid in enumerate(pair.ids):
        right_first, right_second = pair.first[at] == pair.gold[at], pair.second[at] == pair.gold[at]
        if right_first != right_second:
            rows.append({"id": pmid, "change": "wrong → right" if right_second else "right → wrong",
                         "gold": from_code(pair.gold[at]), first_label: from_code(pair.first[at]),
                         second_label: from_code(pair.second[at]), "question": pair.questions[at]})
    return pd.DataFrame(rows[:FLIP_ROWS])


def pair_markdown(pair: RunPair | None, first_label: str, second_label: str, variant: str) -> str:
    if pair is None:
        return f"⚠️ These two runs have no question in common answered by the {variant} model."
    n = len(pair.ids)
    gained = int(np.sum((pair.first != pair.gold) & (pair.second == pair.gold)))
    lost = int(np.sum((pair.first == pair.gold) & (pair.second != pair.gold)))
    lines = [f"**{literal_markdown(variant)} model, {n} questions in both runs**",
             f"- accuracy {accuracy(pair.gold, pair.first):.1%} in *{literal_markdown(first_label)}*, "
             f"{accuracy(pair.gold, pair.second):.1%} in *{literal_markdown(second_label)}*; macro-F1 "
             f"{macro_f1(pair.gold, pair.first):.1%} and {macro_f1(pair.gold, pair.second):.1%}",
             f"- {gained} questions went from wrong to right, {lost} from right to wrong"]
    for test in pair.tests():
        d = test.difference
        lines.append(f"- {test.sentence('the second run', 'the first')}; {d.value * 100:+.1f} points, 95 % interval "
                     f"{d.low * 100:+.1f} to {d.high * 100:+.1f}")
    return "\n".join(lines)


def show_pair(catalogue: RunCatalogue, first_key: Any, second_key: Any, variant: Any) -> tuple[str, Any]:
    """(summary, flips table) for the two runs the page names; a one-line message where it cannot."""
    key = VARIANT_KEYS.get(variant) if isinstance(variant, str) else None
    if key is None or not isinstance(first_key, str) or not isinstance(second_key, str):
        return "Choose two runs and a model.", gr.update(value=pd.DataFrame())
    try:
        first, second = catalogue.resolve(first_key), catalogue.resolve(second_key)
        runs = load_results(first.path), load_results(second.path)
    except (UnknownRunError, ResultsError) as exc:
        return f"⚠️ Cannot compare these runs: {exc}", gr.update(value=pd.DataFrame())
    labels = (f"1: {first.label}", f"2: {second.label}") if first.label == second.label else (first.label,
                                                                                              second.label)
    pair = pair_runs(*runs, key)
    frame = flips_frame(pair, *labels) if pair is not None else pd.DataFrame()
    return pair_markdown(pair, *labels, variant), gr.update(value=frame)


@dataclass
class RunPairControls:
    first: gr.Dropdown
    second: gr.Dropdown
    variant: gr.Radio
    summary: gr.Markdown
    flips: gr.Dataframe


def build_run_pair(catalogue: RunCatalogue) -> RunPairControls:
    """The section's components (inside an accordion of the Evaluation tab)."""
    runs = catalogue.choices()
    with gr.Accordion("Compare two runs", open=False, elem_id="eval-run-pair"):
        with gr.Row():
            first = gr.Dropdown(choices=runs, value=runs[0][1] if runs else None, label="First run", min_width=240,
                                elem_id="eval-pair-first")
            second = gr.Dropdown(choices=runs, value=runs[1][1] if len(runs) > 1 else None, label="Second run",
                                 min_width=240, elem_id="eval-pair-second")
            variant = gr.Radio(list(VARIANT_KEYS), value=variants.choice(variants.PREFERRED), label="Model",
                               min_width=200)
        summary = gr.Markdown(elem_id="eval-pair-summary")
        flips = gr.Dataframe(label=f"Questions that flipped (at most {FLIP_ROWS})", interactive=False, wrap=True,
                             max_height=420, elem_id="eval-pair-flips")
    return RunPairControls(first, second, variant, summary, flips)


def wire_run_pair(controls: RunPairControls, catalogue: RunCatalogue) -> None:
    def show(first: Any, second: Any, variant: Any) -> tuple[str, Any]:
        return show_pair(catalogue, first, second, variant)

    inputs = [controls.first, controls.second, controls.variant]
    gr.on([controls.first.change, controls.second.change, controls.variant.change], show, inputs,
          [controls.summary, controls.flips], api_visibility="private", concurrency_limit=2)
