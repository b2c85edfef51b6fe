"""The Evaluation tab: metric charts of base vs fine-tuned, confusion matrices, the per-example table with filters
and CSV download, and a control to run a new evaluation."""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd
import plotly.graph_objects as go

from app import variants
from app.ui.common import MODEL_EVENTS
from pubmedqa.backends.base import ModelBackend, Variant
from pubmedqa.config import PROJECT_ROOT
from pubmedqa.evaluation.results import ResultsError, RunResults, load_results
from pubmedqa.evaluation.runner import EvalArguments, evaluate

logger = logging.getLogger(__name__)

SHIPPED_RUNS = PROJECT_ROOT / "assets" / "eval"  # runs shipped with the app, one folder each
RUNS_ROOT = Path("outputs") / "eval"  # where `python -m training.evaluate` writes new runs
COLORS = {"base": "#9aa5b1", "tuned": "#e8590c"}
LABELS = {"base": variants.choice(Variant.BASE), "tuned": variants.choice(Variant.TUNED)}  # results keys -> UI
FILTERS = {
    "all questions": lambda b, t, g: True,
    "fine-tuned right, base wrong": lambda b, t, g: t == g and b != g,
    "fine-tuned wrong, base right": lambda b, t, g: t != g and b == g,
    "both wrong": lambda b, t, g: t != g and b != g,
    "gold = yes": lambda b, t, g: g == "yes",
    "gold = no": lambda b, t, g: g == "no",
    "gold = maybe": lambda b, t, g: g == "maybe",
}


def available_runs() -> list[str]:
    """Shipped runs first, then the user's own runs, newest first."""
    shipped = sorted(str(p.parent) for p in SHIPPED_RUNS.glob("*/results.json"))
    own = sorted((str(p.parent) for p in RUNS_ROOT.glob("*/results.json")), reverse=True)
    return shipped + own


def _bars(run: RunResults, metrics: list[tuple[str, Any]], title: str, axis: str, scale: float = 1.0) -> go.Figure:
    figure = go.Figure()
    for key in run.model_keys:
        values = [getter(run.results["models"][key]) for _, getter in metrics]
        shown = [None if v is None else v * scale for v in values]
        figure.add_bar(
            name=LABELS[key], x=[name for name, _ in metrics], y=shown, marker_color=COLORS[key],
            text=["n/a" if v is None else f"{v:.1f}" for v in shown], textposition="outside", cliponaxis=False,
        )
    figure.update_layout(title=title, barmode="group", yaxis_title=axis, height=380, margin={"t": 60, "b": 40})
    return figure


def _get(*path: str):
    def getter(metrics: dict[str, Any]) -> Any:
        value: Any = metrics
        for part in path:
            value = value.get(part) if isinstance(value, dict) else None
        return value

    return getter


def decision_figure(run: RunResults) -> go.Figure:
    return _bars(run, [("accuracy", _get("accuracy")), ("macro-F1", _get("macro_f1"))], "Decision (yes/no/maybe)", "%", 100)


def text_figure(run: RunResults) -> go.Figure:
    metrics = [
        ("Token-F1", _get("token_f1")), ("BLEU", _get("bleu")), ("ROUGE-1", _get("rouge1")), ("ROUGE-L", _get("rougeL")),
        ("BERTScore P", _get("bertscore", "precision")), ("BERTScore R", _get("bertscore", "recall")),
        ("BERTScore F1", _get("bertscore", "f1")),
    ]
    return _bars(run, metrics, "Long answer vs the abstract's conclusion", "score (0-100)")


def judge_figure(run: RunResults) -> go.Figure:
    figure = _bars(run, [("LLM judge (1-5)", _get("judge", "mean"))], "LLM-as-a-judge", "mean grade")
    figure.update_yaxes(range=[0, 5.5])
    return figure


def confusion_figure(run: RunResults, key: str) -> go.Figure:
    matrix = run.results["models"][key]["confusion_matrix"]
    labels, counts = matrix["labels"], matrix["rows_gold_columns_predicted"]
    figure = go.Figure(go.Heatmap(z=counts, x=labels, y=labels, colorscale="Oranges", text=counts, texttemplate="%{text}"))
    figure.update_layout(
        title=f"Confusion matrix — {LABELS[key]}", xaxis_title="predicted", yaxis_title="gold",
        yaxis_autorange="reversed", height=340, margin={"t": 60},
    )
    return figure


def examples_frame(run: RunResults, filter_name: str = "all questions") -> pd.DataFrame:
    keep = FILTERS.get(filter_name, FILTERS["all questions"])
    rows = []
    for example in run.examples:
        base, tuned = example.get("base", {}), example.get("tuned", {})
        if not keep(base.get("decision"), tuned.get("decision"), example["gold"]):
            continue
        row = {"id": example["id"], "question": example["question"], "gold": example["gold"]}
        for key, out in (("base", base), ("tuned", tuned)):
            if out:
                row[f"{key} decision"] = out.get("decision")
                row[f"{key} answer"] = out.get("answer")
                row[f"{key} Token-F1"] = round(out.get("scores", {}).get("token_f1", float("nan")), 1)
        row["reference"] = example["reference"]
        rows.append(row)
    return pd.DataFrame(rows)


def run_summary(run: RunResults) -> str:
    info = run.results["run"]
    lines = [
        f"**Run** `{run.path}` — {info.get('created', '?')}",
        f"**Base** {info.get('base_description', info.get('base_model'))} ({info.get('quantization')}); "
        f"**adapter** {info.get('adapter') or 'none'}",
        f"**Data** {info.get('dataset')}, {info.get('split')}, **N = {info.get('n')}**; decisions by "
        f"{info.get('decision_method', 'option likelihood')}",
        f"**BERTScore model** {info.get('bertscore_model')} (scores compare only within one model); **judge** {info.get('judge')}",
        f"**Wall time** {info.get('timings', {}).get('total_s', 0) / 60:.1f} min",
    ]
    lines += [f"⚠️ {error}" for error in info.get("errors", [])]
    return "  \n".join(lines)


@dataclass
class EvaluationTab:
    """The tab's components."""

    run_choice: gr.Dropdown
    reload: gr.Button
    filter_choice: gr.Dropdown
    n_questions: gr.Slider
    long_answers: gr.Checkbox
    run_button: gr.Button
    shown: list[Any]  # what :func:`show_run` fills, in its order


def build_evaluation_tab(backend: ModelBackend) -> None:
    _wire(_layout(), backend)


def _layout() -> EvaluationTab:
    runs = available_runs()
    with gr.Row():
        run_choice = gr.Dropdown(
            choices=runs, value=runs[0] if runs else None, allow_custom_value=True, scale=4,
            label="Evaluation run (a folder with results.json)",
        )
        reload = gr.Button("Load", scale=1)
    message = gr.Markdown()
    with gr.Row():
        decision_plot = gr.Plot(label="Decision metrics")
        judge_plot = gr.Plot(label="LLM judge")
    text_plot = gr.Plot(label="Long-answer metrics")
    with gr.Row():
        confusion_base = gr.Plot(label="Confusion matrix (base)")
        confusion_tuned = gr.Plot(label="Confusion matrix (fine-tuned)")
    with gr.Row():
        filter_choice = gr.Dropdown(choices=list(FILTERS), value="all questions", label="Show", scale=3)
        download = gr.DownloadButton("Download CSV", scale=1)
    table = gr.Dataframe(label="Per-example results", wrap=True, max_height=500, interactive=False)
    with gr.Accordion("Run a new evaluation", open=False):
        gr.Markdown(
            "Evaluates base and fine-tuned (the loaded adapter) on a label-stratified sample of the official test "
            "set, through the app's model. On a CPU, count about 1 s per question per model for the decisions and "
            "a few seconds for each long answer; the chat waits while it runs."
        )
        with gr.Row():
            n_questions = gr.Slider(10, 500, value=50, step=10, label="Questions")
            long_answers = gr.Checkbox(value=True, label="Long answers + text metrics")
            run_button = gr.Button("Run evaluation", variant="primary")
    shown = [message, decision_plot, text_plot, judge_plot, confusion_base, confusion_tuned, table, download]
    return EvaluationTab(run_choice, reload, filter_choice, n_questions, long_answers, run_button, shown)


def show_run(run_dir: str | None, filter_name: str) -> tuple[Any, ...]:
    """Everything the tab shows of one run folder, or a one-line message where it cannot."""
    empty = (None,) * 5 + (pd.DataFrame(), gr.update(value=None))
    if not run_dir:
        return ("No evaluation results yet: run `python -m training.evaluate` or use *Run a new evaluation* below.",) + empty
    try:
        run = load_results(run_dir)
    except ResultsError as exc:
        return (f"⚠️ Cannot show this run: {exc}",) + empty
    frame = examples_frame(run, filter_name)
    csv = Path(tempfile.mkdtemp()) / f"pubmedqa-eval-{run.path.name}.csv"
    frame.to_csv(csv, index=False)
    has_tuned = "tuned" in run.model_keys
    return (
        run_summary(run), decision_figure(run), text_figure(run), judge_figure(run), confusion_figure(run, "base"),
        confusion_figure(run, "tuned") if has_tuned else None, frame, gr.update(value=str(csv)),
    )


def run_evaluation(backend: ModelBackend, n: float, with_answers: bool, progress: gr.Progress) -> Any:
    """A new run through the app's own backend (no second copy of the model); the selector then shows it."""
    args = EvalArguments(limit=int(n), long_answers=bool(with_answers))
    try:
        run_dir = evaluate(backend.settings, args, progress=lambda f, m: progress(f, desc=m), backend=backend)
    except Exception as exc:  # missing data folder, adapter gone, ...: say so, keep the app serving
        logger.exception("Evaluation failed")
        raise gr.Error(f"Evaluation failed: {exc}") from None
    return gr.update(choices=available_runs(), value=str(run_dir))


def _wire(tab: EvaluationTab, backend: ModelBackend) -> None:
    def start(n: float, with_answers: bool, progress: gr.Progress = gr.Progress()) -> Any:
        return run_evaluation(backend, n, with_answers, progress)

    inputs = [tab.run_choice, tab.filter_choice]
    # No triggers: on page load and whenever the run or the filter changes.
    gr.on(None, show_run, inputs, tab.shown, api_visibility="private")
    tab.reload.click(show_run, inputs, tab.shown, api_visibility="private")
    tab.run_button.click(
        start, [tab.n_questions, tab.long_answers], tab.run_choice, concurrency_id=MODEL_EVENTS,
        api_visibility="private",
    )
