"""The Evaluation tab: metric charts of base vs fine-tuned, confusion matrices, the per-example table with filters
and CSV download, and a control to run a new evaluation."""

from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd
import plotly.graph_objects as go

from app import variants
from app.access import OwnerAccess
from app.eval_runs import RunCatalogue, UnknownRunError
from pubmedqa.backends.base import ModelBackend, Variant
from pubmedqa.backends.status import shown_source
from pubmedqa.config import ServerSettings
from pubmedqa.evaluation.results import ResultsError, RunResults, load_results
from pubmedqa.evaluation.runner import EvalArguments, evaluate

logger = logging.getLogger(__name__)

EVALUATION_EVENTS = "evaluation"  # its own concurrency group: Chat and Compare keep answering while one runs
JUDGE_HOWTO = "`python -m training.evaluate --judge_base_url URL --judge_model NAME`"
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


def readable_figure(run: RunResults) -> go.Figure:
    metrics = [("looping (lower is better)", _get("looping")), ("ended by itself", _get("ended_by_itself"))]
    figure = _bars(run, metrics, "Readable answers: loops and endings", "% of answers")
    figure.update_yaxes(range=[0, 110])
    return figure


def judge_figure(run: RunResults) -> go.Figure:
    if not any(_get("judge", "enabled")(run.results["models"][key]) for key in run.model_keys):
        figure = go.Figure()
        figure.add_annotation(
            text=f"LLM judge: not run for this evaluation.<br>To add it, run {JUDGE_HOWTO.strip('`')}<br>"
            "against any OpenAI-compatible endpoint.", showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper",
        )
        figure.update_layout(title="LLM-as-a-judge", height=380, xaxis_visible=False, yaxis_visible=False)
        return figure
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


def run_summary(run: RunResults, label: str) -> str:
    info = run.results["run"]
    lines = [
        f"**Run** {label} — {info.get('created', '?')}",
        f"**Base** {info.get('base_description', shown_source(info.get('base_model')))} ({info.get('quantization')}); "
        f"**adapter** {shown_source(info.get('adapter'))}",
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
    admin_key: gr.Textbox
    run_button: gr.Button
    shown: list[Any]  # what :func:`show_run` fills, in its order


def build_evaluation_tab(backend: ModelBackend, server: ServerSettings) -> None:
    catalogue = RunCatalogue(server.eval_dir, server.max_eval_runs)
    access = OwnerAccess.from_settings(server)
    _wire(_layout(catalogue, access), backend, catalogue, access)


def _layout(catalogue: RunCatalogue, access: OwnerAccess) -> EvaluationTab:
    runs = catalogue.choices()
    with gr.Row():
        run_choice = gr.Dropdown(choices=runs, value=runs[0][1] if runs else None, scale=4, label="Evaluation run")
        reload = gr.Button("Reload", scale=1)
    message = gr.Markdown()
    with gr.Row():
        decision_plot = gr.Plot(label="Decision metrics")
        judge_plot = gr.Plot(label="LLM judge")
    with gr.Row():
        text_plot = gr.Plot(label="Long-answer metrics", scale=2)
        readable_plot = gr.Plot(label="Readable answers", scale=1)
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
            "a few seconds for each long answer. Chat and Compare keep answering meanwhile: their requests go first, "
            "between the evaluation's batches."
        )
        gr.Markdown(access.how_to(), visible=access.public)
        if access.sign_in:
            gr.LoginButton()
        admin_key = gr.Textbox(label="Admin key", type="password", visible=access.needs_key, max_length=200)
        with gr.Row():
            n_questions = gr.Slider(10, 500, value=50, step=10, label="Questions")
            long_answers = gr.Checkbox(value=True, label="Long answers + text metrics")
            run_button = gr.Button(
                "Run evaluation", variant="primary", interactive=not access.public or access.needs_key,
            )
    shown = [message, decision_plot, text_plot, readable_plot, judge_plot, confusion_base, confusion_tuned, table, download]
    return EvaluationTab(run_choice, reload, filter_choice, n_questions, long_answers, admin_key, run_button, shown)


def show_run(catalogue: RunCatalogue, key: str | None, filter_name: str) -> tuple[Any, ...]:
    """Everything the tab shows of one run, or a one-line message where it cannot."""
    empty = (None,) * 6 + (pd.DataFrame(), gr.update(value=None))
    if not key:
        return ("No evaluation results yet: run `python -m training.evaluate` or use *Run a new evaluation* below.",) + empty
    try:
        entry = catalogue.resolve(key)
        run = load_results(entry.path)
    except (UnknownRunError, ResultsError) as exc:
        return (f"⚠️ Cannot show this run: {exc}",) + empty
    frame = examples_frame(run, filter_name)
    csv = Path(tempfile.mkdtemp()) / f"pubmedqa-eval-{entry.path.name}.csv"
    frame.to_csv(csv, index=False)
    has_tuned = "tuned" in run.model_keys
    return (
        run_summary(run, entry.label), decision_figure(run), text_figure(run), readable_figure(run), judge_figure(run),
        confusion_figure(run, "base"), confusion_figure(run, "tuned") if has_tuned else None, frame,
        gr.update(value=str(csv)),
    )


def run_evaluation(backend: ModelBackend, catalogue: RunCatalogue, n: float, with_answers: bool,
                   progress: gr.Progress) -> Any:
    """A new run through the app's own backend (no second copy of the model); the selector then shows it."""
    # Visitors wait at most for one evaluation batch: one question where batching gains nothing (llama.cpp).
    batch_size = EvalArguments.batch_size if backend.batches_rows else 1
    args = EvalArguments(limit=int(n), long_answers=bool(with_answers), output_dir=str(catalogue.new_run_dir()),
                         batch_size=batch_size)
    try:
        run_dir = evaluate(backend.settings, args, progress=lambda f, m: progress(f, desc=m), backend=backend)
    except Exception as exc:  # missing data folder, adapter gone, full disk...: say so, keep the app serving
        logger.exception("Evaluation failed")
        shutil.rmtree(args.output_dir, ignore_errors=True)  # a run without results.json would only take disk
        raise gr.Error(f"Evaluation failed: {exc}") from None
    catalogue.prune()
    return gr.update(choices=catalogue.choices(), value=catalogue.own_key(run_dir))


def _wire(tab: EvaluationTab, backend: ModelBackend, catalogue: RunCatalogue, access: OwnerAccess) -> None:
    def show(key: str | None, filter_name: str) -> tuple[Any, ...]:
        return show_run(catalogue, key, filter_name)

    def start(n: float, with_answers: bool, key: str, profile: gr.OAuthProfile | None,
              progress: gr.Progress = gr.Progress()) -> Any:
        if refusal := access.refusal(profile, key):  # checked here too: a disabled button is no protection
            raise gr.Error(refusal)
        return run_evaluation(backend, catalogue, n, with_answers, progress)

    def allowed(profile: gr.OAuthProfile | None) -> Any:
        return gr.update(interactive=access.needs_key or access.refusal(profile) is None)

    inputs = [tab.run_choice, tab.filter_choice]
    # No triggers: on page load and whenever the run or the filter changes.
    gr.on(None, show, inputs, tab.shown, api_visibility="private")
    tab.reload.click(show, inputs, tab.shown, api_visibility="private")
    if access.sign_in:  # the owner signed in: the button comes alive on page load
        gr.on(None, allowed, None, tab.run_button, api_visibility="private")
    tab.run_button.click(
        start, [tab.n_questions, tab.long_answers, tab.admin_key], tab.run_choice,
        concurrency_id=EVALUATION_EVENTS, concurrency_limit=1, api_visibility="private",
    )
