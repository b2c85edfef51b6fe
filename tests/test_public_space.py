"""A public deployment stays usable: evaluations are the owner's, visitors never name server paths, Chat keeps
answering while an evaluation runs, and votes cannot fill the disk."""

from __future__ import annotations

import errno
import json
import os
import threading
import time

import gradio as gr
import pytest
from starlette.datastructures import Headers

from app.access import OwnerAccess
from app.eval_runs import RunCatalogue, UnknownRunError
from app.rate_limits import PerMinuteLimiter, visitor_key
from app.ui.evaluation_tab import show_run
from app.ui.interface import build_app
from app.votes import VoteError, VoteLog
from pubmedqa.config import ServerSettings
from pubmedqa.engines.model_lock import ModelLock
from pubmedqa.evaluation.runner import EvalArguments, evaluate
from tests.conftest import REPO_ROOT, serving

SHIPPED = REPO_ROOT / "assets" / "eval"


# ------------------------------------------------------------------------------------------- who may evaluate
def _access(server_name: str = "0.0.0.0", owner: str = "", **environ: str) -> OwnerAccess:
    return OwnerAccess.from_settings(ServerSettings(server_name=server_name, owner=owner), environ)


def test_a_local_app_lets_anyone_evaluate_and_a_public_one_without_configuration_nobody():
    assert _access("127.0.0.1").refusal(None) is None
    closed = _access("0.0.0.0")
    assert closed.public and closed.closed_reason()
    assert "hf_oauth" in closed.refusal(None) and "PUBMEDQA_ADMIN_KEY" in closed.refusal(None, "guess")
    # On a Space the app is public whatever interface it listens on.
    assert _access("127.0.0.1", SPACE_ID="someone/pubmedqa").public


def test_the_admin_key_and_the_owners_sign_in_open_it_and_nothing_else_does():
    keyed = _access(PUBMEDQA_ADMIN_KEY="s3cret-key")
    assert keyed.refusal(None, "s3cret-key") is None
    assert "Wrong admin key" in keyed.refusal(None, "s3cret-kez")
    assert keyed.refusal(None, "") and "s3cret" not in repr(keyed)  # the key never shows in logs or reprs

    space = _access(owner="lab-org", SPACE_ID="lab-org/pubmedqa", OAUTH_CLIENT_ID="abc")
    member = {"preferred_username": "alice", "orgs": [{"preferred_username": "lab-org"}]}
    assert space.refusal(member) is None
    assert space.refusal({"preferred_username": "lab-org"}) is None
    # Plain text: the refusal is shown in a toast, which renders no Markdown.
    assert "sign in with Hugging Face as lab-org." in space.refusal({"preferred_username": "mallory", "orgs": []})
    assert space.refusal(None)


def _evaluation_handler(demo: gr.Blocks):
    [start] = [f for f in demo.fns.values() if getattr(f, "name", "") == "start"]
    return start


def test_a_visitor_of_a_public_app_sees_the_control_disabled_and_the_route_refuses(tiny_engine, tmp_path):
    server = ServerSettings(server_name="0.0.0.0", votes_path=str(tmp_path / "votes.jsonl"), eval_dir=str(tmp_path))
    demo = build_app(tiny_engine, server)
    [button] = [b for b in demo.blocks.values() if isinstance(b, gr.Button) and b.value == "Run evaluation"]
    assert button.interactive is False
    start = _evaluation_handler(demo)
    assert start.concurrency_id != "model"  # not in the model's queue: Chat and Compare keep their turns
    with pytest.raises(gr.Error, match="reserved for the owner"):
        start.fn(10, False, "", None)
    assert list(tmp_path.iterdir()) == []  # nothing ran, nothing written


def test_with_an_admin_key_only_its_holder_can_start_one(tiny_engine, tmp_path, monkeypatch):
    monkeypatch.setenv("PUBMEDQA_ADMIN_KEY", "owner-key")
    server = ServerSettings(server_name="0.0.0.0", votes_path=str(tmp_path / "votes.jsonl"), eval_dir=str(tmp_path))
    start = _evaluation_handler(build_app(tiny_engine, server))
    with pytest.raises(gr.Error, match="Wrong admin key"):
        start.fn(10, False, "not-the-key", None)
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------------- run selector
def _write_run(folder, n: int = 3) -> None:
    source = SHIPPED / "test-500"
    folder.mkdir(parents=True)
    (folder / "results.json").write_text((source / "results.json").read_text())


def test_the_run_selector_offers_runs_by_name_and_refuses_anything_else(tmp_path):
    own, outside = tmp_path / "own", tmp_path / "outside"
    _write_run(own / "20261127-120000")
    _write_run(outside / "secret")
    (own / "escape").symlink_to(outside / "secret")
    catalogue = RunCatalogue(own, keep=10)
    keys = [key for _, key in catalogue.choices()]
    # Shipped runs newest first (the dashboard opens on the first), then the app's own.
    created = {path.parent.name: json.loads(path.read_text())["run"]["created"] for path in SHIPPED.glob("*/results.json")}
    shipped = [f"shipped/{name}" for name in sorted(created, key=created.get, reverse=True)]
    assert "shipped/test-500" in shipped and keys == shipped + ["run here/20261127-120000"]
    labels = " ".join(label for label, _ in catalogue.choices())
    assert str(REPO_ROOT) not in labels and "/" not in labels

    for crafted in (str(outside / "secret"), "run here/../../outside/secret", "run here/escape", "../assets/eval",
                    "/etc", "shipped/test-500/../../.."):
        with pytest.raises(UnknownRunError):
            catalogue.resolve(crafted)
        message = show_run(catalogue, crafted, "all questions")[0]
        assert message.startswith("⚠️") and str(tmp_path) not in message and "/etc" not in message

    summary = show_run(catalogue, "shipped/test-500", "all questions")[0]
    assert "test-500 · shipped" in summary and str(REPO_ROOT) not in summary


def test_the_app_keeps_at_most_n_runs_of_its_own(tmp_path):
    own = tmp_path / "own"
    for name in ("20261101-000000", "20261102-000000", "20261103-000000", "20261104-000000"):
        _write_run(own / name)
    removed = RunCatalogue(own, keep=2).prune()
    assert removed == ["20261101-000000", "20261102-000000"]
    assert sorted(p.name for p in own.iterdir()) == ["20261103-000000", "20261104-000000"]


# ----------------------------------------------------------------------------------- chat during an evaluation
def test_background_work_lets_waiting_requests_go_first():
    lock, order = ModelLock(), []
    lock.acquire()  # a request holds the model; another waits for it
    waiter = threading.Thread(target=lambda: (lock.acquire(), order.append("visitor"), lock.release()))
    waiter.start()
    while lock._waiting == 0:
        time.sleep(0.01)
    background = threading.Thread(target=lambda: (lock.wait_until_idle(), order.append("evaluation batch")))
    background.start()
    time.sleep(0.2)
    assert order == []  # the evaluation waits for both, not just the holder
    lock.release()
    waiter.join(5), background.join(5)
    assert order == ["visitor", "evaluation batch"]
    cancelled = threading.Event()
    cancelled.set()
    lock.acquire()
    assert lock.acquire(cancelled) is False  # Stop while queued gives up at once
    lock.release()


def test_a_chat_answers_while_an_evaluation_runs(tiny_engine, pubmedqa_dir, tmp_path, monkeypatch):
    from gradio_client import Client

    batch_s = 0.3
    original = tiny_engine.generate_with_decisions

    def slow_batch(*args, **kwargs):  # a CPU-sized batch: it holds the model for a while
        with tiny_engine._model_lock:
            time.sleep(batch_s)
        return original(*args, **kwargs)

    monkeypatch.setattr(tiny_engine, "generate_with_decisions", slow_batch)
    server = ServerSettings(votes_path=str(tmp_path / "votes.jsonl"), eval_dir=str(tmp_path / "eval"))
    with serving(build_app(tiny_engine, server)) as url:
        client = Client(url, verbose=False)
        args = EvalArguments(data=str(pubmedqa_dir), limit=40, batch_size=2, max_new_tokens=4, bertscore_model="none",
                             output_dir=str(tmp_path / "eval" / "run"))
        evaluation = threading.Thread(target=evaluate, args=(tiny_engine.settings, args), kwargs={"engine": tiny_engine})
        evaluation.start()
        time.sleep(1.0)
        waits = []
        for _ in range(3):
            started = time.perf_counter()
            answer = client.predict(question="Does aspirin reduce fever?", max_new_tokens=4, api_name="/chat")
            waits.append(time.perf_counter() - started)
            assert answer
        assert evaluation.is_alive(), "the chat answers had to wait for the whole evaluation"
        evaluation.join(120)
    assert (tmp_path / "eval" / "run" / "results.json").is_file()
    assert max(waits) < 10 * batch_s  # at most about one batch of waiting, not the evaluation's 20+ batches


# ---------------------------------------------------------------------------------------------------- votes
def test_votes_per_visitor_per_minute_are_limited():
    now = [0.0]
    limiter = PerMinuteLimiter(per_minute=3, clock=lambda: now[0])
    assert [limiter.allow("a") for _ in range(4)] == [True, True, True, False]
    assert limiter.wait_s("a") == 60.0
    assert limiter.allow("b")  # another visitor has its own budget
    now[0] = 61.0
    assert limiter.allow("a")


def test_a_visitor_is_named_by_what_the_client_cannot_forge(monkeypatch):
    def request(session, host, *forwarded, user=None):
        headers = Headers(raw=[(b"x-forwarded-for", value.encode()) for value in forwarded])
        scope = {"session": {"oauth_info": {"userinfo": {"preferred_username": user}}}} if user else {}
        return type("Request", (), {"session_hash": session, "client": type("C", (), {"host": host})(),
                                    "headers": headers, "scope": scope})()

    assert visitor_key(request("s1", "10.0.0.5")) == visitor_key(request("s2", "10.0.0.5"))  # new sessions share
    # No proxy in front: whatever the client writes into X-Forwarded-For is ignored.
    assert visitor_key(request("s1", "10.0.0.5", "203.0.113.7")) == "ip:10.0.0.5"
    # Behind the Space's proxy (one hop): the address it appended, not what the client wrote before it.
    assert visitor_key(request("s1", "10.0.0.1", "1.2.3.4, 203.0.113.7"), proxy_hops=1) == "ip:203.0.113.7"
    assert visitor_key(request("s1", "10.0.0.1", "1.2.3.4", "203.0.113.7"), proxy_hops=1) == "ip:203.0.113.7"
    assert visitor_key(request("s1", "10.0.0.1"), proxy_hops=1) == "ip:10.0.0.1"  # not through the proxy
    # Signed in with Hugging Face (Gradio's signed session cookie): the account, from any address.
    assert visitor_key(request("s1", "10.0.0.8", user="Alice")) == visitor_key(request("s2", "10.0.0.9", user="alice"))
    assert visitor_key(request("s1", "10.0.0.8", user="alice")) == "user:alice"
    assert visitor_key(None) == "session:anonymous"
    monkeypatch.delenv("SPACE_ID", raising=False)
    assert ServerSettings().trusted_proxy_hops == 0
    monkeypatch.setenv("SPACE_ID", "lab-org/pubmedqa")
    assert ServerSettings().trusted_proxy_hops == 1 and ServerSettings(trusted_proxy_hops=2).trusted_proxy_hops == 2


def test_the_votes_file_is_bounded_and_a_full_box_refuses_with_a_message(tmp_path, caplog):
    log = VoteLog(tmp_path / "votes.jsonl", max_bytes=600)
    accepted = 0
    with pytest.raises(VoteError, match="vote box is full"):
        for _ in range(100):
            log.append("tie", {"question": "q" * 100})
            accepted += 1
    assert 1 <= accepted < 6 and (tmp_path / "votes.jsonl").stat().st_size <= 600
    assert log.summary()["tie"] == accepted  # the votes kept are whole and counted
    with pytest.raises(VoteError):
        log.append("tie", {"question": "q" * 100})
    assert caplog.text.count("reached its limit") == 1  # the owner is told once, not per refused vote


def test_wrong_admin_keys_are_logged_on_one_line_and_slow_the_next_try(caplog):
    keyed = _access(PUBMEDQA_ADMIN_KEY="s3cret-key")
    now = [100.0]
    keyed._failures._clock = lambda: now[0]
    assert "Wrong admin key" in keyed.refusal(None, "guess-1")
    assert "try again in 1 s" in keyed.refusal(None, "s3cret-key")  # not even compared during the wait
    now[0] += 1
    assert "Wrong admin key" in keyed.refusal(None, "guess-2")
    now[0] += 1
    assert "try again in 1 s" in keyed.refusal(None, "guess-3")  # the wait doubles: 2 s after the second
    now[0] += 1
    assert keyed.refusal(None, "s3cret-key") is None  # the owner gets in, and the count starts again
    assert "Wrong admin key" in keyed.refusal(None, "guess-4")
    lines = [r for r in caplog.records if "wrong admin key" in r.getMessage()]
    assert len(lines) == 3 and all(r.exc_info is None for r in lines) and "guess" not in caplog.text


def test_a_full_disk_refuses_the_vote_and_loses_no_earlier_vote(tmp_path, monkeypatch):
    log = VoteLog(tmp_path / "votes.jsonl")
    log.append("tie", {"question": "first"})
    real_write = os.write

    def half_then_full(fd, data):
        real_write(fd, bytes(data[: len(data) // 2]))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", half_then_full)
    with pytest.raises(VoteError, match="earlier votes are safe"):
        log.append("base better", {"question": "second"})
    monkeypatch.setattr(os, "write", real_write)
    log.append("both bad", {"question": "third"})
    lines = [json.loads(line) for line in (tmp_path / "votes.jsonl").read_text().splitlines()]
    assert [line["question"] for line in lines] == ["first", "third"]


def test_a_long_comment_and_a_burst_of_votes_are_refused_in_the_compare_tab(tiny_engine, tmp_path):
    from app.ui.compare_tab import CompareHandlers
    from app.ui.visitor_guard import VisitorGuard

    server = ServerSettings(votes_path=str(tmp_path / "votes.jsonl"), max_comment_chars=20, votes_per_minute=2)
    handlers = CompareHandlers(tiny_engine, server, [], VoteLog(server.votes_path), VisitorGuard(server, public=False))
    request = type("Request", (), {"session_hash": "visitor-1"})()
    with pytest.raises(gr.Error, match="at most 20 characters"):
        handlers.vote("tie", "x" * 21, {"question": "q"}, request)
    handlers.vote("tie", "fine", {"question": "q"}, request)
    handlers.vote("tie", "", {"question": "q"}, request)
    with pytest.raises(gr.Error, match="Too many votes"):
        handlers.vote("tie", "", {"question": "q"}, request)
    assert len((tmp_path / "votes.jsonl").read_text().splitlines()) == 2
