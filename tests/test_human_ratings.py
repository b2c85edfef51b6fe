"""Human ratings: the Chat's thumbs recorded with what produced the answer, the Compare votes and the Chat ratings
summed up for the dashboard (win rate and like-rate with Wilson intervals), forged and flooding ratings, damaged
files, and the owner's reset."""

from __future__ import annotations

import json

import gradio as gr
import pytest
from scipy import stats

from app.human_ratings import ratings_frame, ratings_markdown, summarize
from app.ui.chat_tab import ChatHandlers
from app.ui.visitor_guard import VisitorGuard
from app.votes import VoteLog
from pubmedqa.config import ServerSettings


def _votes_file(tmp_path):
    lines = [{"timestamp": f"2026-12-0{1 + i % 5}T10:00:00+00:00", "vote": vote, "kind": "compare", "question": "Q?"}
             for i, vote in enumerate(["fine-tuned better"] * 6 + ["base better"] * 2 + ["tie", "both bad"])]
    lines += [{"timestamp": "2026-12-06T11:00:00+00:00", "vote": vote, "kind": "chat", "variant": variant}
              for vote, variant in [("like", "fine-tuned")] * 3 + [("dislike", "fine-tuned"), ("like", "base"),
                                                                   ("dislike", "base")]]
    lines.append({"timestamp": "2026-11-30T09:00:00+00:00", "vote": "fine-tuned better"})  # an older vote: no kind
    path = tmp_path / "votes.jsonl"
    text = "\n".join(json.dumps(line) for line in lines)
    path.write_text(text + '\n{"vote": "hacked", "timestamp": "x"}\nnot json at all\n\x00\x01garbage\n')
    return path


def test_votes_and_chat_ratings_are_summed_up_with_wilson_intervals(tmp_path):
    ratings = summarize(VoteLog(_votes_file(tmp_path)).records())
    win = ratings.win_rate
    assert (win.hits, win.n) == (7, 9)  # the older vote counts as a Compare vote; damaged lines cost themselves
    expected = stats.binomtest(7, 9).proportion_ci(method="wilson")
    assert win.interval == pytest.approx((expected.low, expected.high))
    assert (ratings.votes["tie"], ratings.votes["both bad"]) == (1, 1)
    assert {k: (r.hits, r.n) for k, r in ratings.likes.items()} == {"base": (1, 2), "fine-tuned": (3, 4)}
    assert (ratings.first, ratings.last) == ("2026-11-30T09:00:00+00:00", "2026-12-06T11:00:00+00:00")
    text = ratings_markdown(ratings)
    assert "fine-tuned preferred in 78% of 9 (95 % interval" in text and "1 tie, 1 both bad" in text
    assert "**Chat, fine-tuned**: liked 75% of 4" in text and "2026-11-30 09:00 to 2026-12-06 11:00 UTC" in text
    frame = ratings_frame(VoteLog(_votes_file(tmp_path)).records())
    assert len(frame) == 17 and set(frame["kind"]) == {"compare", "chat"}


def test_no_ratings_say_how_to_give_them(tmp_path):
    text = ratings_markdown(summarize(VoteLog(tmp_path / "none.jsonl").records()))
    assert "no votes yet" in text and "no answer rated yet" in text


def test_the_owners_reset_starts_a_new_file_and_keeps_the_old(tmp_path):
    log = VoteLog(_votes_file(tmp_path))
    kept = log.reset()
    assert kept is not None and kept.is_file() and len(kept.read_text().splitlines()) == 20
    assert log.records() == [] and log.reset() is None
    log.append("like", {"kind": "chat", "variant": "base"})
    assert summarize(log.records()).likes["base"].n == 1


def _request(session: str) -> gr.Request:
    return gr.Request(session_hash=session)


@pytest.fixture
def chat(tiny_engine, tmp_path):
    limits = ServerSettings(votes_per_minute=3)
    log = VoteLog(tmp_path / "votes.jsonl")
    handlers = ChatHandlers(tiny_engine, limits, VisitorGuard(limits, public=False), votes=log)
    history = []
    for question in ("Does aspirin help?", "Is it safe?"):
        *_, last = handlers.respond(question, history, "", False, None, "fine-tuned", 6, 0.0, 1.0, 0, 1.0, 0,
                                    _request("s1"))
        history = last[0]
    return handlers, log, history


def _like(index, liked=True, value="x"):
    return gr.LikeData(None, {"index": index, "value": value, "liked": liked})


def test_a_thumb_is_recorded_with_the_answer_that_got_it(chat):
    handlers, log, history = chat
    assert [m["role"] for m in history] == ["user", "assistant"] * 2
    handlers.rate(_like(3, liked=False, value="anything the browser claims"), _request("s1"))
    (record,) = log.records()
    assert record["vote"] == "dislike" and record["kind"] == "chat" and record["question"] == "Is it safe?"
    assert record["variant"] == "fine-tuned" and record["settings"]["max_new_tokens"] == 6
    assert record["answer"] and record["answer"] != "anything the browser claims"


def test_forged_ratings_and_floods_are_refused_and_nothing_is_lost(chat):
    handlers, log, _ = chat
    for forged in (_like(0), _like(99), _like(-1), _like([1, 0]), _like("1"), _like(True), _like(1, liked="Spam"),
                   _like(1, liked=None)):
        handlers.rate(forged, _request("s1"))  # a question, no such answer, not an index, not a thumb
    handlers.rate(_like(1), _request("another session"))  # another visitor's conversation is not theirs to rate
    assert log.records() == []
    handlers.rate(_like(1), _request("s1"))
    handlers.rate(_like(3), _request("s1"))
    handlers.rate(_like(1, liked=False), _request("s1"))
    with pytest.raises(gr.Error, match="at most 3 a minute"):
        handlers.rate(_like(3), _request("s1"))
    assert [r["vote"] for r in log.records()] == ["like", "like", "dislike"]
    handlers.end_session(_request("s1"))
    handlers.rate(_like(1), _request("s1"))  # the page was closed: its answers are forgotten
    assert len(log.records()) == 3


def test_a_full_ratings_file_refuses_with_a_message_and_keeps_what_it_has(chat, tmp_path):
    handlers, _, _ = chat
    handlers.votes = VoteLog(tmp_path / "small.jsonl", max_bytes=10)
    handlers.rate(_like(1), _request("s1"))  # refused: a warning toast, no exception, the file untouched
    assert not (tmp_path / "small.jsonl").exists()
