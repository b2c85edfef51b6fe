"""The Evaluation tab as a newcomer reads it: the per-example table's order, widths and row count, CSV files that
name their filter and do not pile up, runs listed from disk at each refresh, the run button's progress line, the
small-run note, the metric legend and phone-ready charts. No model: the shipped runs and a fake engine."""

from __future__ import annotations

import gc
import json
import re
import shutil
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd
import pytest

from app.eval_runs import CsvExports, RunCatalogue, file_slug
from app.ui import evaluation_tab
from app.ui.evaluation_tab import (
    FILTERS,
    METRIC_LEGEND,
    SMALL_RUN_NOTE,
    EvalProgress,
    build_evaluation_tab,
    column_widths,
    confusion_figure,
    decision_figure,
    example_markdown,
    examples_frame,
    judge_figure,
    plot_value,
    readable_figure,
    row_count,
    run_summary,
    show_run,
    shown_frame,
    text_figure,
)
from pubmedqa.config import ModelSettings, ServerSettings
from pubmedqa.evaluation.results import load_results
from tests.conftest import REPO_ROOT

SHIPPED = REPO_ROOT / "assets" / "eval"
RUN = load_results(SHIPPED / "test-500")
# ``show_run``'s outputs, in ``EvaluationTab.shown``'s order.
MESSAGE, COUNT, TABLE, DOWNLOAD, EXAMPLE = 0, 7, 8, 9, 10


def _copy_run(folder: Path, n: int | None = None, source: str = "test-500") -> Path:
    """A run folder like the app writes, from a shipped one; with ``n``, its first ``n`` examples only."""
    folder.mkdir(parents=True)
    results = json.loads((SHIPPED / source / "results.json").read_text())
    lines = (SHIPPED / source / "examples.jsonl").read_text().splitlines()
    if n is not None:
        results["run"]["n"], lines = n, lines[:n]
    (folder / "results.json").write_text(json.dumps(results))
    (folder / "examples.jsonl").write_text("\n".join(lines) + "\n")
    return folder


# ------------------------------------------------------------------------------------------------- the table
def test_the_table_puts_gold_decisions_and_correctness_first_and_the_long_texts_last():
    frame = shown_frame(examples_frame(RUN))
    assert list(frame.columns[:7]) == [
        "id", "gold", "base decision", "fine-tuned decision", "base correct", "fine-tuned correct", "question",
    ]
    assert list(frame.columns[-1:]) == ["abstract's conclusion"]
    for _, row in frame.head(50).iterrows():
        assert row["base correct"] == ("✓" if row["base decision"] == row["gold"] else "✗")
        assert row["fine-tuned correct"] == ("✓" if row["fine-tuned decision"] == row["gold"] else "✗")
    # The short columns fit beside each other in a 1280 px page (about 1220 px of table); the texts are wide.
    widths = [int(w.removesuffix("px")) for w in column_widths(frame)]
    assert len(widths) == len(frame.columns) and sum(widths[:6]) < 620 and min(widths[6:9]) >= 240


def test_a_base_only_run_gets_as_many_widths_as_columns(tmp_path):
    folder = _copy_run(tmp_path / "base-only", n=5)
    results = json.loads((folder / "results.json").read_text())
    del results["models"]["tuned"]
    (folder / "results.json").write_text(json.dumps(results))
    examples = [json.loads(line) for line in (folder / "examples.jsonl").read_text().splitlines()]
    (folder / "examples.jsonl").write_text("\n".join(json.dumps({k: v for k, v in e.items() if k != "tuned"})
                                                     for e in examples))
    frame = shown_frame(examples_frame(load_results(folder)))
    assert list(frame.columns[:4]) == ["id", "gold", "base decision", "base correct"]
    assert len(column_widths(frame)) == len(frame.columns)


def test_the_row_count_says_how_many_of_how_many_and_which_filter():
    both_wrong = examples_frame(RUN, "both wrong")
    assert row_count(len(both_wrong), 500, "both wrong").startswith(f"Showing {len(both_wrong)} of 500 examples (both wrong)")
    assert row_count(500, 500, "all questions").startswith("Showing 500 of 500 examples.")
    shown = show_run(RunCatalogue(REPO_ROOT / "nowhere", 1), "shipped/test-500", "gold = maybe")
    maybe = sum(e["gold"] == "maybe" for e in RUN.examples)
    assert shown[COUNT].startswith(f"Showing {maybe} of 500 examples (gold = maybe)")
    assert len(shown[TABLE]["value"]) == maybe and shown[TABLE]["column_widths"][0] == "100px"


def test_a_clicked_row_shows_the_whole_example_as_text_never_as_markup():
    example = RUN.examples[0]
    shown = example_markdown(RUN, example["id"])
    assert example["question"].rstrip("?") in shown.replace("\\", "")
    assert example["tuned"]["answer"][:200] in shown.replace("\\", "").replace("  \n", "\n")
    assert "Abstract's conclusion" in shown and example_markdown(RUN, "no-such-id") == ""

    hostile = {**example, "id": "x1", "question": "<img src=x onerror=alert(1)> [click](http://evil.example) **bold**"}
    run = type(RUN)(RUN.path, RUN.results, [hostile])
    shown = example_markdown(run, "x1")
    question = shown.splitlines()[0].removeprefix("### ")
    # every one escaped: no tag, no link (brackets, and the bare URL's scheme), no bold; parentheses alone are no markup
    assert not re.search(r"(?<!\\)[<>\[\]*]", question) and "http:" not in question
    assert question.replace("\\", "") == hostile["question"]


# -------------------------------------------------------------------------------------------------- the CSV
def test_the_csv_is_named_after_run_and_filter_and_holds_the_shown_rows(tmp_path):
    exports = CsvExports(root=tmp_path / "csv")
    catalogue = RunCatalogue(tmp_path / "own", 3)
    shown = show_run(catalogue, "shipped/test-500", "fine-tuned wrong, base right", exports)
    path = Path(shown[DOWNLOAD]["value"])
    assert path.name == "pubmedqa-eval-test-500-fine-tuned-wrong-base-right.csv"
    saved = pd.read_csv(path, dtype={"id": str})
    expected = shown_frame(examples_frame(RUN, "fine-tuned wrong, base right"))
    assert list(saved.columns) == list(expected.columns) and len(saved) == len(expected)
    # The CSV holds the whole texts: the table only cuts them on screen.
    assert saved["question"].str.len().max() == expected["question"].str.len().max() > evaluation_tab.CELL_CHARS
    assert {file_slug(name) for name in FILTERS} == {
        "all-questions", "fine-tuned-right-base-wrong", "fine-tuned-wrong-base-right", "both-wrong", "gold-yes",
        "gold-no", "gold-maybe"}


def test_page_loads_reuse_one_csv_folder_and_one_file_per_run_and_table(tmp_path, monkeypatch):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))  # what a page load leaves in the temp folder, alone
    exports, catalogue = CsvExports(), RunCatalogue(tmp_path / "own", 3)
    first = show_run(catalogue, "shipped/test-500", "all questions", exports)[DOWNLOAD]["value"]
    before = sorted(tmp_path.rglob("*"))
    for _ in range(30):
        again = show_run(catalogue, "shipped/test-500", "all questions", exports)[DOWNLOAD]["value"]
    assert again == first and sorted(tmp_path.rglob("*")) == before  # no new folder or file: the same one rewritten
    assert exports.folder.parent == tmp_path and len(exports.files()) == 2  # the examples shown, and the figures


def test_the_csv_folder_keeps_at_most_its_cap_and_is_removed_with_the_app(tmp_path, monkeypatch):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    exports, catalogue = CsvExports(cap=5), RunCatalogue(tmp_path / "own", 3)
    for run in ("test-500", "test-500-shares"):
        for name in FILTERS:
            show_run(catalogue, f"shipped/{run}", name, exports)
    files = exports.files()
    assert len(files) == 5 and files[0].parent.name == "shipped"
    newest = exports.write(catalogue.resolve("shipped/test-500"), "gold = no", pd.DataFrame({"id": [1]}))
    assert newest in exports.files() and len(exports.files()) == 5
    folder = exports.folder
    del exports
    gc.collect()
    assert not folder.exists()


def test_the_csv_of_an_own_run_and_a_shipped_run_of_the_same_name_do_not_collide(tmp_path):
    _copy_run(tmp_path / "own" / "test-500", n=3)
    exports, catalogue = CsvExports(root=tmp_path / "csv"), RunCatalogue(tmp_path / "own", 3)
    own = show_run(catalogue, "run here/test-500", "all questions", exports)[DOWNLOAD]["value"]
    shipped = show_run(catalogue, "shipped/test-500", "all questions", exports)[DOWNLOAD]["value"]
    assert own != shipped and Path(own).name == Path(shipped).name
    assert len(pd.read_csv(own)) == 3 and len(pd.read_csv(shipped)) == 500


def test_nothing_shown_names_a_server_path(tmp_path):
    exports = CsvExports(root=tmp_path / "csv")
    shown = show_run(RunCatalogue(tmp_path / "own", 3), "shipped/test-500", "both wrong", exports)
    texts = [shown[MESSAGE], shown[COUNT], shown[EXAMPLE]]
    assert not any(str(REPO_ROOT) in t or str(tmp_path) in t for t in texts)
    assert "/" not in Path(shown[DOWNLOAD]["value"]).name  # the button shows its label; the download, this name


# ------------------------------------------------------------------------------------------ runs from disk
class _FakeEngine:
    settings = ModelSettings(adapter="fake-adapter")
    batches_rows = True


def _tab_fns(tmp_path: Path, all_fns: bool = False, **server: Any) -> Any:
    """The tab's event functions by name (with ``all_fns``, all of them in a list)."""
    with gr.Blocks() as demo:
        build_evaluation_tab(_FakeEngine(), ServerSettings(eval_dir=str(tmp_path / "eval"), **server))
    if all_fns:
        return list(demo.fns.values())
    return {getattr(f, "name", ""): f for f in demo.fns.values()}


def test_a_run_written_after_the_page_was_built_is_listed_at_the_next_refresh(tmp_path):
    refresh = _tab_fns(tmp_path)["refresh"].fn
    choices = refresh("shipped/test-500", "all questions")[0]["choices"]
    assert ("20270101-000000 · run here", "run here/20270101-000000") not in choices
    _copy_run(tmp_path / "eval" / "20270101-000000", n=20)  # another visitor's run, or one from before a restart
    update, message, *_ = refresh("shipped/test-500", "all questions")
    assert ("20270101-000000 · run here", "run here/20270101-000000") in update["choices"]
    assert update["value"] == "shipped/test-500" and "test-500 · shipped" in message
    # A run that went away (pruned): the first listed one is shown instead.
    shutil.rmtree(tmp_path / "eval" / "20270101-000000")
    update, message, *_ = refresh("run here/20270101-000000", "all questions")
    assert update["value"] == update["choices"][0][1] and message.startswith("**Run**")


# --------------------------------------------------------------------------------------- running an evaluation
def test_the_progress_line_counts_questions_per_model_and_estimates_the_time_left():
    now = [100.0]
    progress = EvalProgress(50, ["base", "tuned"], clock=lambda: now[0])
    assert progress.line(0.0, "base: decisions") == "Base: 0/50 questions · estimating time left"
    now[0] += 60
    line = progress.line(0.25, "base: decisions and answers")  # a quarter in a minute: three minutes to go
    assert line == "Base: 25/50 questions · about 3 min left"
    now[0] += 60
    assert progress.line(0.5, "base: decisions").startswith("Base: 50/50 questions · scoring ·")
    now[0] += 100
    assert progress.line(0.9, "tuned: decisions") == "Fine-tuned: 40/50 questions · under a minute left"
    assert progress.line(1.0, "done").startswith("Finishing")
    assert EvalProgress(10, ["base"]).line(0.5, "base: decisions").startswith("Base: 5/10 questions ·")
    assert max(len(progress.line(f, m)) for f, m in ((0.1, "base: x"), (0.5, "base: x"), (0.99, "tuned: x"))) <= 55


def test_the_run_button_is_disabled_while_running_and_comes_back_after_success_or_failure(tmp_path):
    every = _tab_fns(tmp_path, all_fns=True)
    fns = {f.name: f for f in every}
    disabled, status = fns["lock"].fn()
    assert disabled["interactive"] is False and status == ""
    # The run is chained: lock, then the evaluation, then settle, after a success and after a failure.
    assert fns["start"].trigger_after == fns["lock"]._id and fns["start"].concurrency_id == "evaluation"
    settles = [f for f in every if f.name == "settle"]
    assert {(f.trigger_after, f.trigger_only_on_success, f.trigger_only_on_failure) for f in settles} == {
        (fns["start"]._id, False, False), (fns["start"]._id, False, True)}
    enabled, status = fns["settle"].fn("Done: 10 questions in 0.1 min", None)
    assert enabled["interactive"] is True and status.startswith("Done:")
    enabled, status = fns["settle"].fn("", None)
    assert enabled["interactive"] is True and status == evaluation_tab.NOT_RUN


def test_a_finished_small_run_selects_itself_and_says_it_is_too_small(tmp_path, monkeypatch):
    calls = []

    def fake_evaluate(settings, args, progress=None, engine=None):
        for fraction, message in ((0.25, "base: decisions"), (0.75, "tuned: decisions"), (1.0, "done")):
            progress(fraction, message)
        calls.append(args)
        return _copy_run(Path(args.output_dir), n=args.limit)

    seen = []
    monkeypatch.setattr(evaluation_tab, "evaluate", fake_evaluate)
    start = _tab_fns(tmp_path)["start"].fn
    update, status = start(20, False, "", None, progress=lambda fraction, desc: seen.append(desc))
    assert calls[0].limit == 20 and update["value"].startswith("run here/")
    assert status.startswith("Done: 20 questions") and SMALL_RUN_NOTE in status
    assert seen[0].startswith("Base: 10/20 questions") and seen[1].startswith("Fine-tuned: 10/20")
    summary = run_summary(load_results(tmp_path / "eval" / update["value"].split("/", 1)[1]), "x")
    assert SMALL_RUN_NOTE in summary.splitlines()[0]
    assert SMALL_RUN_NOTE not in run_summary(RUN, "test-500")


def test_a_failed_run_is_a_plain_message_and_leaves_no_folder(tmp_path, monkeypatch):
    def failing(settings, args, progress=None, engine=None):
        Path(args.output_dir).mkdir(parents=True)
        raise FileNotFoundError("PubMedQA data not found")

    monkeypatch.setattr(evaluation_tab, "evaluate", failing)
    start = _tab_fns(tmp_path)["start"].fn
    with pytest.raises(gr.Error, match="Evaluation failed: PubMedQA data not found") as raised:
        start(10, False, "", None, progress=lambda fraction, desc: None)
    assert raised.value.print_exception is False  # user_error: no traceback in a toast or a flooded log
    assert list((tmp_path / "eval").iterdir()) == []


def test_a_refused_visitor_gets_a_plain_message(tmp_path):
    start = _tab_fns(tmp_path, server_name="0.0.0.0")["start"].fn
    with pytest.raises(gr.Error, match="reserved for the owner") as raised:
        start(10, False, "", None)
    assert raised.value.print_exception is False


# -------------------------------------------------------------------------------------- charts and legend
def test_every_metric_has_a_plain_line_in_the_legend():
    for metric in ("Accuracy", "Macro-F1", "Token-F1", "BLEU", "ROUGE-1 / ROUGE-L", "BERTScore P / R / F1",
                   "Looping", "LLM judge"):
        assert f"**{metric}**" in METRIC_LEGEND
    assert all(len(line) < 400 for line in METRIC_LEGEND.splitlines())


def test_charts_come_without_mode_bar_with_their_legend_in_a_row_and_no_drag_zoom():
    for figure in (decision_figure(RUN), text_figure(RUN), readable_figure(RUN), judge_figure(RUN),
                   confusion_figure(RUN, "tuned")):
        sent = json.loads(plot_value(figure).plot)
        assert sent["config"]["displayModeBar"] is False
        assert sent["layout"]["dragmode"] is False and sent["layout"]["xaxis"]["fixedrange"] is True
        if figure.data and figure.data[0].type == "bar":
            assert sent["layout"]["legend"]["orientation"] == "h"
            assert sent["layout"]["uniformtext"] == {"minsize": 9, "mode": "hide"}  # labels hidden, never overlapping
    assert plot_value(None) is None
    assert confusion_figure(RUN, "base").data[0].showscale is False


def test_long_tick_labels_wrap_and_bar_values_leave_room_for_the_legend():
    readable = readable_figure(RUN)
    assert list(readable.layout.xaxis.ticktext) == ["looping<br>(lower is better)", "ended<br>by itself"]
    decision = decision_figure(RUN)
    top = max(max(trace.y) for trace in decision.data if trace.type == "bar")
    assert decision.layout.yaxis.range[1] > top * 1.1
    assert list(text_figure(RUN).data[0].text) == [f"{v:.0f}" for v in text_figure(RUN).data[0].y]


def test_the_judge_how_to_fits_a_phone():
    figure = judge_figure(RUN)  # the shipped run has no judge
    text = figure.layout.annotations[0].text
    assert "--judge_base_url" in text and "--judge_model" in text
    assert max(len(line) for line in text.split("<br>")) <= 36  # about 300 px at 12 px: no line cut at 390 px
