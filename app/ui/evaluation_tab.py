"""The Evaluation tab: metric charts of base vs fine-tuned with a plain-language legend, confusion matrices, the
per-example table (filters, row count, the full example on click, CSV download), and a control to run a new
evaluation with its progress next to the button."""

from __future__ import annotations

import base64
import importlib.resources
import json
import logging
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import gradio as gr
import pandas as pd
import plotly.graph_objects as go
from gradio.components.plot import PlotData

from app.access import OwnerAccess
from app.eval_runs import CsvExports, EvalRun, RunCatalogue, UnknownRunError
from app.human_ratings import ratings_frame, ratings_markdown, summarize
from app.literal_text import literal_markdown
from app.model_status import shown_source
from app.ui.eval_significance import add_reference_lines, comparison_markdown, error_bars, figures_frame, significance
from app.ui.run_pairs import RunPairControls, build_run_pair, wire_run_pair
from app.ui.user_messages import user_error
from app.votes import VoteLog
from pubmedqa import variants
from pubmedqa.config import ServerSettings
from pubmedqa.engines.base import Engine
from pubmedqa.evaluation.results import ResultsError, RunResults, load_results
from pubmedqa.evaluation.runner import EvalArguments, evaluate
from pubmedqa.evaluation.significance import RunSignificance

logger = logging.getLogger(__name__)

EVALUATION_EVENTS = "evaluation"  # its own concurrency group: Chat and Compare keep answering while one runs
JUDGE_HOWTO = "`python -m scripts.evaluate --judge_base_url URL --judge_model NAME`"
COLORS = {variants.BASE_KEY: "#9aa5b1", variants.TUNED_KEY: "#e8590c"}
FILTERS = {
    "all questions": lambda b, t, g: True,
    "fine-tuned right, base wrong": lambda b, t, g: t == g and b != g,
    "fine-tuned wrong, base right": lambda b, t, g: t != g and b == g,
    "both wrong": lambda b, t, g: t != g and b != g,
    "gold = yes": lambda b, t, g: g == "yes",
    "gold = no": lambda b, t, g: g == "no",
    "gold = maybe": lambda b, t, g: g == "maybe",
}
RELIABLE_N = 100  # below this many questions, a few answers move accuracy by points: differences are mostly noise
SMALL_RUN_NOTE = "too few questions to compare models reliably"
# No mode bar: on a phone its icons cover the chart's title and legend, and zooming a bar chart gains nothing.
PLOT_CONFIG = {"displayModeBar": False, "scrollZoom": False}
DONE = "Done:"
NOT_RUN = "No new run: the message in the corner says why."
CELL_CHARS = 80  # long texts in the table are cut here (the Dataframe shows the rest on click; the row opens below)
ID, NARROW, DECISION, NUMBER, TEXT = "100px", "76px", "100px", "96px", "280px"  # column widths: short values first, texts last

# One plain line per metric, shown under the charts: what a newcomer needs to read them.
METRIC_LEGEND = """\
**How to read the charts**
- **Accuracy**: share of questions where the model's yes / no / maybe is the experts' answer.
- **Macro-F1**: the F1 score of yes, of no and of maybe, averaged, so the rare *maybe* counts as much as *yes*; \
a model that always says *yes* gets a high accuracy but a low macro-F1.
- **Token-F1**: how many words the model's explanation shares with the abstract's conclusion (0-100).
- **BLEU**: how many 1- to 4-word phrases of the explanation appear in the conclusion; strict, so low values are normal.
- **ROUGE-1 / ROUGE-L**: words in common with the conclusion / the longest run of words in the same order.
- **BERTScore P / R / F1**: closeness in meaning measured by a small language model: **P** how much of the answer the \
conclusion supports, **R** how much of the conclusion the answer covers, **F1** both together. Compare base and \
fine-tuned of one run, not numbers across runs.
- **Looping**: share of answers that repeat themselves (lower is better); **ended by itself**: share that finished \
before the length limit.
- **LLM judge**: another language model grades each answer from 1 (wrong) to 5 (correct and complete) against the \
conclusion.
"""


def _get(*path: str) -> Callable[[dict[str, Any]], Any]:
    def getter(metrics: dict[str, Any]) -> Any:
        value: Any = metrics
        for part in path:
            value = value.get(part) if isinstance(value, dict) else None
        return value

    return getter


def _wrapped(name: str) -> str:
    """A tick label on two lines at its first space, so category names fit a phone's narrow columns."""
    head, _, tail = name.partition(" ")
    return f"{head}<br>{tail}" if tail else head


def _phone_layout(figure: go.Figure, title: str, height: int) -> None:
    """What every chart shares: a short title at the left, the legend in one row above the plot (a legend at the
    right takes a third of a phone's width), no drag-to-zoom (a finger scrolling the page would zoom instead)."""
    figure.update_layout(
        title={"text": title, "x": 0, "xanchor": "left", "font": {"size": 15}},
        legend={"orientation": "h", "yanchor": "bottom", "y": 1.0, "xanchor": "left", "x": 0},
        height=height, margin={"t": 70, "b": 10, "l": 40, "r": 10}, dragmode=False,
    )
    figure.update_xaxes(fixedrange=True, automargin=True)
    figure.update_yaxes(fixedrange=True, automargin=True)


def _bars(run: RunResults, metrics: list[tuple[str, Any]], title: str, axis: str, scale: float = 1.0,
          digits: int = 1, found: RunSignificance | None = None, interval_keys: list[str | None] | None = None,
          ) -> go.Figure:
    """Grouped bars of ``metrics`` per variant; with ``found``, each bar's 95 % interval (``interval_keys``: the
    interval of each metric, None where there is none) as an error bar."""
    figure = go.Figure()
    names = [name for name, _ in metrics]
    top = 0.0
    for key in run.model_keys:
        values = [getter(run.results["models"][key]) for _, getter in metrics]
        shown = [None if v is None else v * scale for v in values]
        bars = error_bars(found, key, interval_keys or [], scale) if interval_keys else None
        highs = [v + (plus or 0) for v, plus in zip(shown, bars["array"])] if bars else shown
        top = max([top, *(v for v in highs if v is not None)])
        figure.add_bar(
            name=variants.RESULTS_LABELS[key], x=names, y=shown, marker_color=COLORS[key], error_y=bars,
            text=["n/a" if v is None else f"{v:.{digits}f}" for v in shown], cliponaxis=False,
            # With error bars the value sits inside its bar, at the foot, where no whisker crosses it.
            textposition="inside" if bars else "outside", insidetextanchor="start",
        )
    _phone_layout(figure, title, 380)
    # Bar labels shrink to their bar's width; one that would need less than 9 px is hidden rather than overlapping
    # its neighbour (a phone, seven metrics): the value stays on tap/hover. Headroom above the highest bar keeps
    # its label off the legend.
    figure.update_layout(barmode="group", yaxis_title=axis, uniformtext={"minsize": 9, "mode": "hide"})
    figure.update_yaxes(range=[0, (top or 1) * 1.18])
    if len(names) <= 3:  # few, wide columns: long names wrap
        figure.update_xaxes(tickmode="array", tickvals=names, ticktext=[_wrapped(n) for n in names])
    else:  # many narrow ones on a phone: angled, ending at their bar, so none runs past the chart's right edge
        figure.update_xaxes(tickangle=-45)
    return figure


def decision_figure(run: RunResults, found: RunSignificance | None = None) -> go.Figure:
    names = ["accuracy", "macro-F1"]
    figure = _bars(run, [(names[0], _get("accuracy")), (names[1], _get("macro_f1"))], "Decision (yes/no/maybe)", "%",
                   100, found=found, interval_keys=["accuracy", "macro_f1"])
    add_reference_lines(figure, run, names)
    return figure


def text_figure(run: RunResults, found: RunSignificance | None = None) -> go.Figure:
    metrics = [
        ("Token-F1", _get("token_f1")), ("BLEU", _get("bleu")), ("ROUGE-1", _get("rouge1")), ("ROUGE-L", _get("rougeL")),
        ("BERTScore P", _get("bertscore", "precision")), ("BERTScore R", _get("bertscore", "recall")),
        ("BERTScore F1", _get("bertscore", "f1")),
    ]
    # Whole numbers: seven pairs of bars share a phone's width, and a point on these scores means little.
    return _bars(run, metrics, "Long answer vs the<br>abstract's conclusion", "score (0-100)", digits=0, found=found,
                 interval_keys=["token_f1", "bleu", "rouge1", "rougeL", None, None, "bertscore_f1"])


def readable_figure(run: RunResults, found: RunSignificance | None = None) -> go.Figure:
    metrics = [("looping (lower is better)", _get("looping")), ("ended by itself", _get("ended_by_itself"))]
    figure = _bars(run, metrics, "Readable answers:<br>loops and endings", "% of answers", found=found,
                   interval_keys=["looping", "ended"])
    figure.update_xaxes(ticktext=["looping<br>(lower is better)", "ended<br>by itself"])
    figure.update_yaxes(range=[0, 110])
    return figure


def judge_figure(run: RunResults) -> go.Figure:
    if not any(_get("judge", "enabled")(run.results["models"][key]) for key in run.model_keys):
        figure = go.Figure()
        # Plotly does not wrap annotations: short lines, so that none is cut off on a 390 px phone.
        command = JUDGE_HOWTO.strip("`").replace(" --", "<br>    --")
        figure.add_annotation(
            text=f"Not run for this evaluation.<br>To add it, run<br>{command}<br>against any OpenAI-compatible<br>"
            "endpoint.", showarrow=False, x=0, y=0.5, xref="paper", yref="paper", xanchor="left", align="left",
            font={"size": 12},
        )
        _phone_layout(figure, "LLM-as-a-judge", 380)
        figure.update_layout(xaxis_visible=False, yaxis_visible=False, plot_bgcolor="rgba(0,0,0,0)")
        return figure
    figure = _bars(run, [("LLM judge (1-5)", _get("judge", "mean"))], "LLM-as-a-judge", "mean grade")
    figure.update_yaxes(range=[0, 5.5])
    return figure


def confusion_figure(run: RunResults, key: str) -> go.Figure:
    matrix = run.results["models"][key]["confusion_matrix"]
    labels, counts = matrix["labels"], matrix["rows_gold_columns_predicted"]
    # No colour bar: the counts are written in the cells, and the bar would take a sixth of a phone's width.
    figure = go.Figure(go.Heatmap(z=counts, x=labels, y=labels, colorscale="Oranges", text=counts,
                                  texttemplate="%{text}", showscale=False))
    _phone_layout(figure, f"Confusion matrix — {variants.RESULTS_LABELS[key]}", 340)
    figure.update_layout(xaxis_title="predicted", yaxis_title="gold", yaxis_autorange="reversed")
    return figure


def plot_value(figure: go.Figure | None) -> PlotData | None:
    """``figure`` as gr.Plot sends it, with :data:`PLOT_CONFIG`: Gradio's Plotly renderer reads the config from the
    figure's JSON, which ``Figure.to_json`` leaves out."""
    if figure is None:
        return None
    plot = json.loads(figure.to_json())
    plot["config"] = PLOT_CONFIG
    return PlotData(type="plotly", plot=json.dumps(plot))


def examples_frame(run: RunResults, filter_name: str = "all questions") -> pd.DataFrame:
    """The run's examples that pass the filter, one row each, short columns first (results' names: base / tuned)."""
    keep = FILTERS.get(filter_name, FILTERS["all questions"])
    rows = []
    for example in run.examples:
        base, tuned = example.get(variants.BASE_KEY, {}), example.get(variants.TUNED_KEY, {})
        if not keep(base.get("decision"), tuned.get("decision"), example["gold"]):
            continue
        row: dict[str, Any] = {"id": example["id"], "gold": example["gold"]}
        outputs = [(key, out) for key, out in ((variants.BASE_KEY, base), (variants.TUNED_KEY, tuned)) if out]
        for key, out in outputs:
            row[f"{key} decision"] = out.get("decision")
        for key, out in outputs:
            row[f"{key} correct"] = "✓" if out.get("decision") == example["gold"] else "✗"
        row["question"] = example["question"]
        for key, out in outputs:
            row[f"{key} answer"] = out.get("answer")
        for key, out in outputs:
            row[f"{key} Token-F1"] = round(out.get("scores", {}).get("token_f1", float("nan")), 1)
        row["reference"] = example["reference"]
        rows.append(row)
    return pd.DataFrame(rows)


def shown_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` with the page's names (fine-tuned, not tuned; the conclusion, not the reference): what the table
    shows and the CSV holds."""
    def header(column: str) -> str:
        tuned = f"{variants.TUNED_KEY} "
        if column.startswith(tuned):
            column = column.replace(tuned, f"{variants.RESULTS_LABELS[variants.TUNED_KEY]} ", 1)
        return {"reference": "abstract's conclusion"}.get(column, column)

    return frame.rename(columns=header)


def column_widths(frame: pd.DataFrame) -> list[str]:
    """Narrow columns for ids, labels and numbers, so that at 1280 px the decisions and ✓/✗ fit beside the id."""
    def width(column: str) -> str:
        if column == "id":
            return ID
        if column == "gold" or column.endswith("correct"):
            return NARROW
        if column.endswith("decision"):
            return DECISION
        if column.endswith("Token-F1"):
            return NUMBER
        return TEXT

    return [width(str(column)) for column in frame.columns]


def row_count(shown: int, total: int, filter_name: str) -> str:
    if filter_name == "all questions":
        return f"Showing {shown} of {total} examples. Click a row to read it in full below the table."
    return f"Showing {shown} of {total} examples ({filter_name}). Click a row to read it in full below the table."


def _plain(text: Any) -> str:
    """Model and dataset text shown as written: every Markdown/HTML character escaped, so that nothing in an answer
    formats, links or hides the rest."""
    return literal_markdown(str(text if text is not None else "")).replace("\n", "  \n")


def example_markdown(run: RunResults, example_id: Any) -> str:
    """One example in full: the question, the gold answer, each model's decision (with its probabilities) and
    answer, and the abstract's conclusion."""
    example = next((e for e in run.examples if str(e.get("id")) == str(example_id)), None)
    if example is None:
        return ""
    lines = [f"### {_plain(example['question'])}", f"**id** {_plain(example['id'])} · **gold** {_plain(example['gold'])}"]
    for key in run.model_keys:
        out = example.get(key) or {}
        if not out:
            continue
        mark = "✓" if out.get("decision") == example["gold"] else "✗"
        probabilities = out.get("probabilities") or {}
        shares = ", ".join(f"{label} {100 * p:.0f} %" for label, p in probabilities.items() if isinstance(p, float))
        lines.append(f"**{variants.RESULTS_LABELS[key]}**: {_plain(out.get('decision'))} {mark}"
                     + (f" ({shares})" if shares else ""))
        if out.get("answer"):
            lines.append(f"> {_plain(out['answer'])}")
    lines.append(f"**Abstract's conclusion**: {_plain(example.get('reference'))}")
    return "\n\n".join(lines)


def run_summary(run: RunResults, label: str) -> str:
    info = run.results["run"]
    lines = [
        f"**Run** {label} — {info.get('created', '?')}",
        (f"**Base** {info.get('base_description', shown_source(info.get('base_model')))} ({info.get('quantization')}); "
         f"**adapter** {shown_source(info.get('adapter'))}"),
        (f"**Data** {info.get('dataset')}, {info.get('split')}, **N = {info.get('n')}**; decisions by "
         f"{info.get('decision_method', 'option likelihood')}"),
        f"**BERTScore model** {info.get('bertscore_model')} (scores compare only within one model); **judge** {info.get('judge')}",
        f"**Wall time** {info.get('timings', {}).get('total_s', 0) / 60:.1f} min",
    ]
    if (note := small_run_note(info.get("n"))) is not None:
        lines.insert(0, note)
    lines += [f"⚠️ {error}" for error in info.get("errors", [])]
    return "  \n".join(lines)


def small_run_note(n: Any) -> str | None:
    """The warning a run of fewer than :data:`RELIABLE_N` questions carries, or None."""
    if isinstance(n, int) and 0 < n < RELIABLE_N:
        return f"⚠️ **{n} questions: {SMALL_RUN_NOTE}**; differences of a few points here are chance."
    return None


class EvalProgress:
    """The line shown next to the Run button while an evaluation runs: the model, its questions done of the total,
    and the time left, estimated from the pace so far (``clock`` is injectable for tests). Gradio adds the share of
    the whole run done (both models) and the time spent."""

    def __init__(self, n: int, models: list[str], clock: Callable[[], float] = time.monotonic):
        self.n, self.models, self.clock = n, models, clock
        self.started = clock()

    def line(self, fraction: float, message: str) -> str:
        """``fraction`` of the whole run is done; ``message`` is the runner's ("base: decisions", "done")."""
        key = message.split(":", 1)[0].strip()
        if key not in self.models:
            return "Finishing: writing the results…"
        step = self.models.index(key)
        within = min(max(fraction * len(self.models) - step, 0.0), 1.0)
        done = min(self.n, round(within * self.n))
        # Short: Gradio writes it on one line with the percentage and a timer, in a phone's 300 px.
        label = variants.RESULTS_LABELS[key].capitalize()
        parts = [f"{label}: {done}/{self.n} questions"]
        if done == self.n:
            parts.append("scoring")
        parts.append(self.time_left(fraction))
        return " · ".join(parts)

    def time_left(self, fraction: float) -> str:
        elapsed = self.clock() - self.started
        if fraction <= 0.02 or elapsed < 3:
            return "estimating time left"
        left = elapsed * (1 - fraction) / fraction
        return "under a minute left" if left < 60 else f"about {math.ceil(left / 60)} min left"


@dataclass
class EvaluationTab:
    """The tab's components."""

    run_choice: gr.Dropdown
    reload: gr.Button
    filter_choice: gr.Dropdown
    table: gr.Dataframe
    example: gr.Markdown
    n_questions: gr.Slider
    long_answers: gr.Checkbox
    admin_key: gr.Textbox
    run_button: gr.Button
    run_status: gr.Markdown
    shown: list[Any]  # what :func:`show_run` fills, in its order
    ratings: RatingsControls
    pair: RunPairControls


@dataclass
class RatingsControls:
    """The Human ratings section and the owner's export and reset of the ratings."""

    summary: gr.Markdown
    key: gr.Textbox
    export: gr.Button
    reset: gr.Button
    file: gr.File
    status: gr.Markdown


def build_evaluation_tab(engine: Engine, server: ServerSettings, votes: VoteLog | None = None) -> None:
    catalogue = RunCatalogue(server.eval_dir, server.max_eval_runs)
    access = OwnerAccess.from_settings(server)
    votes = votes or VoteLog(server.votes_path, max_bytes=server.max_votes_mb << 20)
    _wire(_layout(catalogue, access), engine, catalogue, CsvExports(), access, votes)


def _layout(catalogue: RunCatalogue, access: OwnerAccess) -> EvaluationTab:
    runs = catalogue.choices()
    with gr.Row():
        # min_width: on a phone the run's name keeps the whole width and Reload goes under it.
        run_choice = gr.Dropdown(choices=runs, value=runs[0][1] if runs else None, scale=4, label="Evaluation run",
                                 elem_id="eval-run", min_width=280)
        reload = gr.Button("Reload", scale=1, min_width=100)
    message = gr.Markdown(elem_id="eval-summary")
    # min_width: two charts side by side need about 320 px each; below that (a phone) they stack.
    with gr.Row():
        decision_plot = gr.Plot(label="Decision metrics", min_width=320)
        with gr.Column(min_width=320):  # the LLM's grades and the people's ratings, side by side
            judge_plot = gr.Plot(label="LLM judge")
            human = gr.Markdown(elem_id="eval-human-ratings")
    with gr.Row():
        text_plot = gr.Plot(label="Long-answer metrics", scale=2, min_width=320)
        readable_plot = gr.Plot(label="Readable answers", scale=1, min_width=320)
    with gr.Row():
        confusion_base = gr.Plot(label="Confusion matrix (base)", min_width=320)
        confusion_tuned = gr.Plot(label="Confusion matrix (fine-tuned)", min_width=320)
    gr.Markdown(METRIC_LEGEND, elem_id="eval-legend")
    comparison = gr.Markdown(elem_id="eval-comparison")
    figures = gr.Dataframe(label="Figures with their 95 % intervals", interactive=False, wrap=True, pinned_columns=1,
                           elem_id="eval-figures")
    figures_download = gr.DownloadButton("Download figures CSV", min_width=140, elem_id="eval-figures-download")
    with gr.Row(equal_height=True):
        filter_choice = gr.Dropdown(choices=list(FILTERS), value="all questions", label="Show", scale=3,
                                    elem_id="eval-filter")
        download = gr.DownloadButton("Download CSV", scale=1, min_width=140, elem_id="eval-download")
    count = gr.Markdown(elem_id="eval-count")
    table = gr.Dataframe(
        label="Per-example results", interactive=False, wrap=True, max_height=520, max_chars=CELL_CHARS,
        pinned_columns=1, elem_id="eval-table",
    )
    example = gr.Markdown(elem_id="eval-example")
    with gr.Accordion("Run a new evaluation", open=False):
        gr.Markdown(
            "Evaluates base and fine-tuned (the loaded adapter) on a label-stratified sample of the official test "
            "set, through the app's model. On a CPU, count about 1 s per question per model for the decisions and "
            "a few seconds for each long answer. Chat and Compare keep answering meanwhile: their requests go first, "
            "between the evaluation's batches."
        )
        gr.Markdown(access.how_to(), visible=access.public)
        if access.sign_in:
            _sign_in_button()
        admin_key = gr.Textbox(label="Admin key", type="password", visible=access.needs_key, max_length=200)
        with gr.Row():
            n_questions = gr.Slider(10, 500, value=50, step=10, label="Questions",
                                    info=f"Below {RELIABLE_N}: {SMALL_RUN_NOTE}.")
            long_answers = gr.Checkbox(value=True, label="Long answers + text metrics")
        with gr.Row(equal_height=True):
            run_button = gr.Button(
                "Run evaluation", variant="primary", interactive=not access.public or access.needs_key, scale=1,
                min_width=160, elem_id="eval-run-button",
            )
            # Progress shows here, beside the button the user just pressed, not over the run selector at the top.
            with gr.Column(scale=2, min_width=240):
                run_status = gr.Markdown(elem_id="eval-run-status", min_height=80)
    pair = build_run_pair(catalogue)
    with gr.Accordion("Human ratings: export or reset", open=False):
        gr.Markdown("The ratings with their questions and answers as a CSV, or a new start (the current file is kept "
                    "beside the new one, renamed). The owner's alone: visitors' questions are in it.")
        ratings_key = gr.Textbox(label="Admin key", type="password", visible=access.needs_key, max_length=200)
        with gr.Row(equal_height=True):
            export = gr.Button("Export ratings CSV", min_width=160, elem_id="eval-ratings-export")
            reset = gr.Button("Reset ratings", variant="stop", min_width=160, elem_id="eval-ratings-reset")
        ratings_file = gr.File(label="Ratings CSV", visible=False, interactive=False)
        ratings_status = gr.Markdown(elem_id="eval-ratings-status")
    shown = [message, decision_plot, text_plot, readable_plot, judge_plot, confusion_base, confusion_tuned, count,
             table, download, example, comparison, figures, figures_download]
    ratings = RatingsControls(human, ratings_key, export, reset, ratings_file, ratings_status)
    return EvaluationTab(run_choice, reload, filter_choice, table, example, n_questions, long_answers, admin_key,
                         run_button, run_status, shown, ratings, pair)


def show_run(catalogue: RunCatalogue, key: str | None, filter_name: str,
             exports: CsvExports | None = None) -> tuple[Any, ...]:
    """Everything the tab shows of one run (see ``EvaluationTab.shown``), or a one-line message where it cannot;
    with ``exports``, the shown examples as a CSV to download."""
    empty = (None,) * 6 + ("", gr.update(value=pd.DataFrame()), gr.update(value=None), "", "",
                           gr.update(value=pd.DataFrame()), gr.update(value=None))
    if not key:
        return ("No evaluation results yet: run `python -m scripts.evaluate` or use *Run a new evaluation* below.",) + empty
    try:
        entry = catalogue.resolve(key)
        run = load_results(entry.path)
    except (UnknownRunError, ResultsError) as exc:
        return (f"⚠️ Cannot show this run: {exc}",) + empty
    frame = shown_frame(examples_frame(run, filter_name))
    has_tuned = variants.TUNED_KEY in run.model_keys
    found = significance(run)
    confusions = [confusion_figure(run, variants.BASE_KEY),
                  confusion_figure(run, variants.TUNED_KEY) if has_tuned else None]
    figures = [decision_figure(run, found), text_figure(run, found), readable_figure(run, found), judge_figure(run),
               *confusions]
    table = figures_frame(run, found)
    return (
        run_summary(run, entry.label), *map(plot_value, figures),
        row_count(len(frame), len(run.examples), filter_name),
        gr.update(value=frame, column_widths=column_widths(frame)),
        gr.update(value=_csv(exports, entry, filter_name, frame)), "",
        comparison_markdown(run, found), gr.update(value=table),
        gr.update(value=_csv(exports, entry, "figures with intervals", table)),
    )


def _csv(exports: CsvExports | None, entry: EvalRun, filter_name: str, frame: pd.DataFrame) -> str | None:
    if exports is None:
        return None
    try:
        return str(exports.write(entry, filter_name, frame))
    except OSError as exc:  # a full disk: the dashboard still shows, the download is just not offered
        logger.warning("Could not write the CSV of %s: %s", entry.key, exc)
        return None


def run_evaluation(engine: Engine, catalogue: RunCatalogue, n: float, with_answers: bool,
                   progress: gr.Progress) -> tuple[Any, str]:
    """A new run through the app's own engine (no second copy of the model); the selector then shows it, and the
    line beside the button says it is done."""
    # Visitors wait at most for one evaluation batch: one question where batching gains nothing (llama.cpp).
    batch_size = EvalArguments.batch_size if engine.batches_rows else 1
    args = EvalArguments(limit=int(n), long_answers=bool(with_answers), output_dir=str(catalogue.new_run_dir()),
                         batch_size=batch_size)
    models = [variants.BASE_KEY, variants.TUNED_KEY] if engine.settings.adapter_source else [variants.BASE_KEY]
    tracker = EvalProgress(args.limit, models)
    try:
        run_dir = evaluate(engine.settings, args, engine=engine,
                           progress=lambda f, m: progress(f, desc=tracker.line(f, m)))
    except Exception as exc:  # missing data folder, adapter gone, full disk...: say so, keep the app serving
        logger.exception("Evaluation failed")
        shutil.rmtree(args.output_dir, ignore_errors=True)  # a run without results.json would only take disk
        raise user_error(f"Evaluation failed: {exc}") from None
    catalogue.prune()
    minutes = (time.monotonic() - tracker.started) / 60
    done = f"{DONE} {args.limit} questions in {minutes:.1f} min; the run is shown above."
    if args.limit < RELIABLE_N:
        done += f" Note: {SMALL_RUN_NOTE}."
    return gr.update(choices=catalogue.choices(), value=catalogue.own_key(run_dir)), done


def _wire(tab: EvaluationTab, engine: Engine, catalogue: RunCatalogue, exports: CsvExports,
          access: OwnerAccess, votes: VoteLog) -> None:
    def refresh(key: str | None, filter_name: str) -> tuple[Any, ...]:
        # The runs are listed from disk on every refresh: one started here, by this visitor or another, shows up
        # on a reload or the next page load, not only after a restart.
        choices = catalogue.choices()
        keys = [choice_key for _, choice_key in choices]
        key = key if key in keys else (keys[0] if keys else None)
        return (gr.update(choices=choices, value=key), *show_run(catalogue, key, filter_name, exports),
                ratings_markdown(summarize(votes.records())), gr.update(choices=choices), gr.update(choices=choices))

    def export_ratings(key: str, profile: gr.OAuthProfile | None) -> tuple[Any, str]:
        if refusal := access.refusal(profile, key):
            raise user_error(refusal)
        records = votes.records()
        path = exports.write_named("ratings", "pubmedqa-human-ratings.csv", ratings_frame(records))
        return gr.update(value=str(path), visible=True), f"{len(records)} ratings exported."

    def reset_ratings(key: str, profile: gr.OAuthProfile | None) -> tuple[str, str]:
        if refusal := access.refusal(profile, key):
            raise user_error(refusal)
        kept = votes.reset()
        done = f"Ratings reset; the earlier ones are kept as {kept.name}." if kept else "There were no ratings."
        return ratings_markdown(summarize(votes.records())), done

    def read_example(key: str | None, evt: gr.SelectData) -> str:
        row = evt.row_value or []
        try:
            run = load_results(catalogue.resolve(key or "").path)
        except (UnknownRunError, ResultsError):
            return ""
        return example_markdown(run, row[0]) if row else ""

    def start(n: float, with_answers: bool, key: str, profile: gr.OAuthProfile | None,
              progress: gr.Progress = gr.Progress()) -> tuple[Any, str]:
        if refusal := access.refusal(profile, key):  # checked here too: a disabled button is no protection
            raise user_error(refusal)
        return run_evaluation(engine, catalogue, n, with_answers, progress)

    def allowed(profile: gr.OAuthProfile | None) -> Any:
        return gr.update(interactive=access.needs_key or access.refusal(profile) is None)

    def lock() -> tuple[Any, str]:
        return gr.update(interactive=False), ""  # the progress bar appears here in its place

    def settle(status: str | None, profile: gr.OAuthProfile | None) -> tuple[Any, str]:
        # No "Done" line: refused or failed, and the toast says why.
        failed = not (status or "").startswith(DONE)
        return allowed(profile), NOT_RUN if failed else (status or "")

    inputs = [tab.run_choice, tab.filter_choice]
    outputs = [tab.run_choice, *tab.shown, tab.ratings.summary, tab.pair.first, tab.pair.second]
    wire_run_pair(tab.pair, catalogue)
    tab.ratings.export.click(export_ratings, tab.ratings.key, [tab.ratings.file, tab.ratings.status],
                             api_visibility="private", concurrency_limit=1)
    tab.ratings.reset.click(reset_ratings, tab.ratings.key, [tab.ratings.summary, tab.ratings.status],
                            api_visibility="private", concurrency_limit=1)
    # No triggers: on page load and whenever the run or the filter changes (a finished evaluation selects its run).
    gr.on(None, refresh, inputs, outputs, api_visibility="private")
    tab.reload.click(refresh, inputs, outputs, api_visibility="private")
    tab.table.select(read_example, tab.run_choice, tab.example, api_visibility="private", show_progress="hidden")
    if access.sign_in:  # the owner signed in: the button comes alive on page load
        gr.on(None, allowed, None, tab.run_button, api_visibility="private")
    # Disabled at once (no queue), so that nobody clicks twice while it runs; re-enabled whatever the run's outcome.
    # Gradio 6.31's page runs a .then() only after a success, although documented as "regardless": .failure() too.
    running = tab.run_button.click(lock, None, [tab.run_button, tab.run_status], queue=False,
                                   api_visibility="private", show_progress="hidden")
    running = running.then(
        start, [tab.n_questions, tab.long_answers, tab.admin_key], [tab.run_choice, tab.run_status],
        concurrency_id=EVALUATION_EVENTS, concurrency_limit=1, api_visibility="private",
        show_progress_on=[tab.run_status],
    )
    for after in (running.then, running.failure):
        after(settle, tab.run_status, [tab.run_button, tab.run_status], api_visibility="private", queue=False,
              show_progress="hidden")


def _sign_in_button() -> gr.LoginButton:
    """Gradio's sign-in button with its Hugging Face logo inlined: given as a file, the logo's path on this server
    (inside the virtual environment) would be in the page's public /config."""
    logo = (importlib.resources.files("gradio") / "icons" / "huggingface-logo.svg").read_bytes()
    return gr.LoginButton(icon={"path": "huggingface-logo.svg",
                                "url": "data:image/svg+xml;base64," + base64.b64encode(logo).decode()})
