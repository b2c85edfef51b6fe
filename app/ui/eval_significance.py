"""How sure a run's figures are, as the Evaluation tab shows them: error bars for the charts, reference lines on the
decision chart (the majority answer, human performance from the PubMedQA paper), a table of every figure with its
95 % interval and standard error (also a CSV), and one plain sentence per base-vs-fine-tuned test."""

from __future__ import annotations

import threading
from collections import Counter, OrderedDict

import pandas as pd
import plotly.graph_objects as go

from pubmedqa import variants
from pubmedqa.evaluation.results import EXAMPLES_FILE, RunResults
from pubmedqa.evaluation.significance import Interval, RunSignificance, format_p, run_significance

#: Human performance on PubMedQA's test set (reasoning-required setting), Jin et al., EMNLP 2019, Table 3.
HUMAN = {"accuracy": 0.780, "macro_f1": 0.722}
HUMAN_SOURCE = "single human annotator, PubMedQA paper (Jin et al., 2019)"
#: The figures of the table, by results key: (label, scale to the chart's unit).
FIGURES = {
    "accuracy": ("accuracy", 100.0), "macro_f1": ("macro-F1", 100.0), "token_f1": ("Token-F1", 1.0),
    "bleu": ("BLEU", 1.0), "rouge1": ("ROUGE-1", 1.0), "rougeL": ("ROUGE-L", 1.0),
    "bertscore_f1": ("BERTScore F1", 1.0), "looping": ("looping", 1.0), "ended": ("ended by itself", 1.0),
}


_CACHE: OrderedDict[tuple[str, float, tuple[str, ...]], RunSignificance] = OrderedDict()
_CACHE_SIZE = 16
_cache_lock = threading.Lock()


def significance(run: RunResults) -> RunSignificance | None:
    """The run's intervals and tests, computed once per run folder and version (about a second for 500 questions),
    or None without per-question lines."""
    if not run.examples:
        return None
    examples = run.path / EXAMPLES_FILE
    key = (str(run.path), examples.stat().st_mtime if examples.is_file() else 0.0, tuple(run.model_keys))
    with _cache_lock:
        if key in _CACHE:
            _CACHE.move_to_end(key)
            return _CACHE[key]
    found = run_significance(run.examples, run.model_keys, variants.BASE_KEY, variants.TUNED_KEY)
    with _cache_lock:
        _CACHE[key] = found
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    return found


def error_bars(found: RunSignificance | None, key: str, metric_keys: list[str | None], scale: float) -> dict | None:
    """Plotly ``error_y`` for one variant's bars: each bar's 95 % interval (none where it has no interval)."""
    intervals = (found.intervals.get(key, {}) if found else {})
    if not any(m in intervals for m in metric_keys if m):
        return None
    plus, minus = [], []
    for metric in metric_keys:
        interval = intervals.get(metric) if metric else None
        plus.append(None if interval is None else (interval.high - interval.value) * scale)
        minus.append(None if interval is None else (interval.value - interval.low) * scale)
    return {"type": "data", "symmetric": False, "array": plus, "arrayminus": minus, "thickness": 1.2, "width": 4}


def majority_reference(run: RunResults) -> tuple[str, dict[str, float]] | None:
    """The scores of always answering the run's most frequent gold decision ("always yes" on PubMedQA)."""
    gold = [str(e.get("gold")) for e in run.examples if e.get("gold")]
    if not gold:
        return None
    answer, count = Counter(gold).most_common(1)[0]
    share = count / len(gold)
    # Macro-F1 over three options: the answer's F1 is 2p/(1+p), the other two score 0.
    return f'always "{answer}"', {"accuracy": share, "macro_f1": (2 * share / (1 + share)) / 3}


def add_reference_lines(figure: go.Figure, run: RunResults, names: list[str]) -> None:
    """Dashed lines across the decision bars: the majority answer's scores, and human performance where the run is
    the official 500-question test set (the setting the paper reports)."""
    info = run.results.get("run", {})
    references = []
    if (majority := majority_reference(run)) is not None:
        references.append((majority[0], majority[1], "#495057", "dash"))
    if info.get("n") == 500 and "official test" in str(info.get("split", "")):
        references.append(("human (PubMedQA paper)", HUMAN, "#2b8a3e", "dot"))
    metric_keys = ["accuracy", "macro_f1"]
    if references:  # room for the highest line above the bars' own headroom
        highest = max(values[m] * 100 for _, values, _, _ in references for m in metric_keys)
        low, high = figure.layout.yaxis.range or (0, 0)
        figure.update_yaxes(range=[low or 0, max(high or 0, highest * 1.12)])
    for label, values, color, dash in references:
        for i, name in enumerate(names[: len(metric_keys)]):
            y = values[metric_keys[i]] * 100
            figure.add_shape(type="line", xref="x", yref="y", x0=i - 0.45, x1=i + 0.45, y0=y, y1=y,
                             line={"color": color, "width": 1.5, "dash": dash})
        # One entry per reference line (an invisible trace carries it) in a second legend under the chart, so that
        # the bars' legend keeps its one row above it on a phone; the source is under the charts.
        figure.add_scatter(x=[None], y=[None], mode="lines", name=label, line={"color": color, "dash": dash},
                           hoverinfo="skip", legend="legend2")
    if references:
        figure.update_layout(legend2={"orientation": "h", "yanchor": "top", "y": -0.14, "xanchor": "left", "x": 0},
                             height=(figure.layout.height or 380) + 50, margin={"b": 60})


def _cell(interval: Interval | None, scale: float) -> tuple[str, str]:
    if interval is None:
        return "", ""
    return (f"{interval.value * scale:.1f}",
            f"{interval.low * scale:.1f} – {interval.high * scale:.1f} (SE {interval.stderr * scale:.1f})")


def figures_frame(run: RunResults, found: RunSignificance | None) -> pd.DataFrame:
    """Every figure with its interval: one row per metric, a value and an interval column per variant, then the
    difference (fine-tuned − base) with its interval and p-value where both variants ran."""
    rows = []
    for metric, (label, scale) in FIGURES.items():
        row: dict[str, str] = {"metric": label}
        present = False
        for key in run.model_keys:
            interval = found.intervals.get(key, {}).get(metric) if found else None
            present |= interval is not None
            shown = variants.RESULTS_LABELS[key]
            row[shown], row[f"{shown} 95 % interval"] = _cell(interval, scale)
        test = found.tests.get(metric) if found else None
        if test is not None:
            value, spread = _cell(test.difference, scale)
            row["difference"], row["difference 95 % interval"] = value, spread
            row["p"], row["test"] = format_p(test.p_value), test.test
        if present:
            rows.append(row)
    return pd.DataFrame(rows)


def comparison_markdown(run: RunResults, found: RunSignificance | None) -> str:
    """One sentence per tested figure, and how the intervals were found."""
    n = len(run.examples)
    if found is None or not found.intervals:
        return "_No per-question results in this run: its figures come without intervals._"
    lines = [f"**How sure these figures are** (95 % intervals: bootstrap over the {n} questions, 2,000 resamples, "
             "seed 0; the charts' error bars)"]
    for metric in ("accuracy", "macro_f1", "token_f1", "rougeL", "bertscore_f1"):
        if (test := found.tests.get(metric)) is not None:
            lines.append(f"- {test.sentence()}")
    if len(lines) == 1:
        lines.append("- Only one variant in this run: no comparison of base and fine-tuned.")
    if (majority := majority_reference(run)) is not None:
        label, scores = majority
        lines.append(f"- Reference lines on the decision chart: {label} scores {scores['accuracy']:.1%} accuracy and "
                     f"{scores['macro_f1']:.1%} macro-F1 on these questions; human performance, where the run is the "
                     f"official test set: {HUMAN['accuracy']:.1%} and {HUMAN['macro_f1']:.1%} ({HUMAN_SOURCE}).")
    return "\n".join(lines)

