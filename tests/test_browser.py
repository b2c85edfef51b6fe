"""Real-browser tests: Playwright drives Debian's Chromium through the app as a user would (tiny model), and saves
screenshots to test-artifacts/.

Locally they are skipped when Chromium or Playwright is missing; in CI (CI=true) that is a failure, since
``.ci/run`` installs both.
"""

from __future__ import annotations

import json
import time

import pytest

from app.ui.interface import build_app
from pubmedqa.config import ModelSettings, ServerSettings
from pubmedqa.engines.transformers_engine import TransformersEngine
from tests.browser_support import CHROMIUM, CHROMIUM_ARGS, PHONE, TIMEOUT_MS, require_browser
from tests.conftest import REPO_ROOT, serving

pytestmark = pytest.mark.browser
ARTIFACTS = REPO_ROOT / "test-artifacts"


def _loaded_tiny_engine(tiny_model_dir, tiny_adapter_dir) -> TransformersEngine:
    settings = ModelSettings(base_model=str(tiny_model_dir), adapter=str(tiny_adapter_dir), quantization="none")
    engine = TransformersEngine(settings)
    engine.load()
    return engine


@pytest.fixture(scope="module")
def app_url(tiny_model_dir, tiny_adapter_dir, tmp_path_factory):
    engine = _loaded_tiny_engine(tiny_model_dir, tiny_adapter_dir)
    limits = ServerSettings(max_new_tokens_limit=256, votes_path=str(tmp_path_factory.mktemp("votes") / "votes.jsonl"))
    with serving(build_app(engine, limits)) as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    require_browser()
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, app_url):
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    _wait_ready(page, app_url)
    yield page
    context.close()


def _ask(page, question: str) -> None:
    box = page.locator("#chat-question textarea")
    box.fill(question)
    box.press("Enter")


def _wait_rows(page, count: int) -> None:
    """Wait until the conversation shows ``count`` message rows; on a timeout, fail with what the page showed then
    (rows, question box, toasts, a screenshot), so that a failure in CI says which step did not happen."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    try:
        page.wait_for_function(f"() => document.querySelectorAll('#chat-conversation .message-row').length === {count}")
    except PlaywrightTimeout:
        page.screenshot(path=str(ARTIFACTS / f"chat-rows-timeout-{count}.png"), full_page=True)
        shown = {
            "rows": page.locator("#chat-conversation .message-row").all_inner_texts(),
            "question box": page.locator("#chat-question textarea").input_value(),
            "toasts": page.locator(".toast-body").all_inner_texts(),
            "page text": page.locator("body").inner_text()[:2000],
        }
        pytest.fail(f"the conversation never showed {count} message rows; the page showed: {shown}")


def _bot_messages(page):
    return page.locator("#chat-conversation .message-row.bot-row")


def _answer_snapshots(page, index: int = 0, settle_s: float = 1.5) -> list[str]:
    """The successive texts of a bot message while it is generated, until it has not changed for ``settle_s``."""
    bot = _bot_messages(page).nth(index)
    bot.wait_for()
    seen: list[str] = []
    changed, deadline = time.monotonic(), time.monotonic() + 60
    # Settling counts from the last change once text has appeared: a busy machine may take seconds to the first token.
    while (not seen or time.monotonic() - changed < settle_s) and time.monotonic() < deadline:
        text = bot.inner_text().strip()
        if text and text != "…" and (not seen or seen[-1] != text):
            seen.append(text)
            changed = time.monotonic()
        time.sleep(0.01)
    return seen


def _wait_answer(page, index: int = 0) -> str:
    return _answer_snapshots(page, index)[-1]


def test_chat_streams_an_answer_and_clear_empties_the_conversation(page):
    _ask(page, "Does aspirin reduce the risk of myocardial infarction?")
    seen = _answer_snapshots(page)
    assert len(seen) >= 2 and len(seen[-1]) > len(seen[0]), f"the answer did not grow while streaming: {seen}"
    assert "(stopped)" not in seen[-1]  # an answer that ended by itself is not marked as stopped
    assert page.get_by_text("Does aspirin reduce the risk").count()
    page.screenshot(path=str(ARTIFACTS / "chat-answer.png"), full_page=True)

    page.locator("#chat-clear").click()
    page.wait_for_function("() => !document.querySelector('#chat-conversation .message')")
    assert _bot_messages(page).count() == 0
    page.screenshot(path=str(ARTIFACTS / "chat-cleared.png"), full_page=True)


def test_markup_in_a_question_is_shown_as_text_and_never_runs(page):
    payload = ("<img src=x onerror=\"window.__pwned=1\"><script>window.__pwned=2</script> <b>bold</b> **star** "
               "[link](https://example.org) & 1. Is it safe?")
    _ask(page, payload)
    _wait_answer(page)
    assert page.evaluate("() => window.__pwned") is None
    conversation = page.locator("#chat-conversation")
    user = conversation.locator(".message-row.user-row").first
    assert user.inner_text().strip() == payload  # every character as typed: nothing rendered, nothing dropped
    for element in ("img", "b", "strong", "a", "script"):
        assert user.locator(element).count() == 0, f"a <{element}> element was rendered from the question"
    _ask(page, "And <i>this</i>?")  # the first turn went back to the server as history and is shown unchanged
    _wait_answer(page, 1)
    assert conversation.locator(".message-row.user-row").first.inner_text().strip() == payload
    assert conversation.locator(".message-row.user-row").nth(1).inner_text().strip() == "And <i>this</i>?"


def test_sessions_are_separate_and_clear_clears_only_its_own(browser, app_url, page):
    _ask(page, "Is session A's question kept?")
    _wait_answer(page)
    other_context = browser.new_context()
    other = other_context.new_page()
    other.set_default_timeout(TIMEOUT_MS)
    other.goto(app_url)
    other.get_by_text("Model status: Ready").wait_for()
    assert _bot_messages(other).count() == 0 and not other.get_by_text("session A's question").count()
    _ask(other, "Is session B's question kept?")
    _wait_answer(other)
    other.locator("#chat-clear").click()
    other.wait_for_function("() => !document.querySelector('#chat-conversation .message')")
    assert page.get_by_text("session A's question").count() and _bot_messages(page).count() == 1
    other_context.close()


def test_compare_shows_two_answers_side_by_side(page):
    page.get_by_role("tab", name="Compare").click()
    page.locator("#compare-question textarea").fill("Is ultrasound as accurate as X-ray for fractures?")
    page.get_by_role("button", name="Compare", exact=True).click()
    for side in ("#compare-base-answer", "#compare-tuned-answer"):
        page.wait_for_function(f"() => document.querySelector('{side}').innerText.trim().length > 0")
    page.get_by_text("Model's yes/no/maybe probabilities").first.wait_for()  # labelled as scores, not as the text
    page.get_by_text("The text ").first.wait_for()
    page.screenshot(path=str(ARTIFACTS / "compare.png"), full_page=True)
    base = page.locator("#compare-base-answer").inner_text()
    tuned = page.locator("#compare-tuned-answer").inner_text()
    assert base.strip() and tuned.strip()


def test_evaluation_tab_renders_plotly_bar_charts(page):
    page.get_by_role("tab", name="Evaluation").click()
    bars = page.locator(".js-plotly-plot g.trace.bars path")
    bars.first.wait_for()
    assert bars.count() >= 4  # base and fine-tuned bars for several metrics
    page.screenshot(path=str(ARTIFACTS / "evaluation.png"), full_page=True)


def test_the_medical_disclaimer_is_visible_on_every_tab(page):
    for tab in ("Chat", "Compare", "Evaluation"):
        page.get_by_role("tab", name=tab).click()
        assert page.get_by_text("not medical advice").first.is_visible(), tab


def _open_page(browser, url: str, viewport: dict | None = None):
    context = browser.new_context(viewport=viewport or {"width": 1400, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    _wait_ready(page, url)
    return context, page


def _wait_ready(page, url: str) -> None:
    """Open ``url`` and wait until the page's load events have answered (the model choice is enabled by the status
    poll's first reply), not only until the status line is drawn: it is in the page as first served."""
    page.goto(url)
    page.get_by_text("Model status: Ready").wait_for()
    page.wait_for_function("() => { const r = document.querySelector('#chat-model input'); return r && !r.disabled; }")


def test_a_visitor_of_a_public_app_sees_the_evaluation_control_disabled_with_the_reason(
    browser, tiny_model_dir, tiny_adapter_dir, tmp_path
):
    engine = _loaded_tiny_engine(tiny_model_dir, tiny_adapter_dir)
    public = ServerSettings(server_name="0.0.0.0", votes_path=str(tmp_path / "votes.jsonl"), eval_dir=str(tmp_path / "eval"))
    with serving(build_app(engine, public)) as url:
        context, page = _open_page(browser, url)
        page.get_by_role("tab", name="Evaluation").click()
        page.get_by_text("Run a new evaluation").click()
        button = page.get_by_role("button", name="Run evaluation")
        button.wait_for()
        assert button.is_disabled()
        assert page.get_by_text("reserved for the owner of this public app").is_visible()
        # The latest shipped run, by its name, not a path.
        assert page.get_by_label("Evaluation run").input_value() == "test-500-shares · shipped"
        page.screenshot(path=str(ARTIFACTS / "evaluation-public.png"), full_page=True)
        context.close()


def test_a_comparison_past_the_limit_is_refused_on_the_question_when_sent(browser, tiny_model_dir, tiny_adapter_dir,
                                                                          tmp_path):
    engine = _loaded_tiny_engine(tiny_model_dir, tiny_adapter_dir)
    public = ServerSettings(server_name="0.0.0.0", heavy_per_minute=1, votes_path=str(tmp_path / "votes.jsonl"))
    with serving(build_app(engine, public)) as url:
        for viewport in ({"width": 1280, "height": 900}, PHONE):
            context, page = _open_page(browser, url, viewport)
            page.get_by_role("tab", name="Compare").click()
            box = page.locator("#compare-question textarea")
            box.fill("Is the first one answered?")
            box.press("Enter")
            if viewport is not PHONE:  # the first comparison of this visitor runs; the next one is past the limit
                page.get_by_text("tokens · first token").first.wait_for()
                box.fill("Is the second one refused?")
                box.press("Enter")
            refusal = page.locator("#compare-question").get_by_text("at most 1 such requests a minute per visitor")
            refusal.wait_for()
            assert box.input_value().startswith("Is the")  # the question stays in its box: nothing typed is lost
            page.screenshot(path=str(ARTIFACTS / f"compare-refused-{viewport['width']}.png"), full_page=True)
            context.close()


def test_chat_answers_while_an_evaluation_started_in_the_page_runs(
    browser, tiny_model_dir, tiny_adapter_dir, tmp_path, pubmedqa_dir
):
    engine = _loaded_tiny_engine(tiny_model_dir, tiny_adapter_dir)
    scored, batch_s = [], 1.0
    original = engine.score_decisions

    def slow_batch(*args, **kwargs):  # a CPU-sized evaluation batch holds the model for a while
        with engine._model_lock:
            time.sleep(batch_s)
        scored.append(time.monotonic())
        return original(*args, **kwargs)

    engine.score_decisions = slow_batch
    local = ServerSettings(votes_path=str(tmp_path / "votes.jsonl"), eval_dir=str(tmp_path / "eval"))
    with serving(build_app(engine, local)) as url:
        context, page = _open_page(browser, url)
        page.get_by_role("tab", name="Evaluation").click()
        page.get_by_text("Run a new evaluation").click()
        page.get_by_label("Long answers + text metrics").uncheck()
        page.get_by_role("button", name="Run evaluation").click()  # 50 questions: 14 batches of about 1 s
        while not scored:
            time.sleep(0.05)
        page.get_by_role("tab", name="Chat").click()
        _ask(page, "Does the chat answer during an evaluation?")
        answer = _wait_answer(page)
        batches_when_answered = len(scored)
        assert answer and batches_when_answered < 14, "the chat waited for the whole evaluation"
        page.screenshot(path=str(ARTIFACTS / "chat-during-evaluation.png"), full_page=True)
        deadline = time.monotonic() + 120
        while len(scored) < 14 and time.monotonic() < deadline:  # let it finish before the app closes
            time.sleep(0.2)
        context.close()


def test_the_status_line_is_plain_and_the_details_open_on_request(page):
    status = page.locator("#model-status").inner_text()
    assert "Ready · " in status and "fine-tuned adapter loaded" in status and "/" not in status
    assert not page.get_by_text("LoRA adapter loaded").is_visible()
    page.get_by_text("Model details").click()
    page.get_by_text("LoRA adapter loaded").wait_for()
    placeholder = page.locator("#chat-conversation").inner_text()
    assert "on the right" not in placeholder and "Abstract / context box" in placeholder
    page.screenshot(path=str(ARTIFACTS / "status-details.png"), full_page=True)




def _top(page, selector: str) -> float:
    return page.locator(selector).first.bounding_box()["y"]


def test_on_a_phone_the_model_choice_and_the_abstract_come_before_the_buttons(browser, app_url):
    context = browser.new_context(viewport=PHONE, is_mobile=True, has_touch=True)
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(app_url)
    page.get_by_text("Model status: Ready").wait_for()
    send = _top(page, "#chat-send")
    assert _top(page, "#chat-model") < send and _top(page, "#chat-context") < send
    assert page.locator("#chat-question textarea").bounding_box()["width"] > 150  # the question box stays usable
    width = page.evaluate("() => document.documentElement.scrollWidth")
    assert width <= PHONE["width"] + 1, f"the page scrolls sideways on a phone ({width} px)"
    page.screenshot(path=str(ARTIFACTS / "phone-chat.png"), full_page=True)
    context.close()


@pytest.fixture
def slow_app_url(tiny_model_dir, tiny_adapter_dir, tmp_path):
    """The app on a engine that takes 0.3 s per token, so that Stop lands in the middle of an answer."""
    engine = _loaded_tiny_engine(tiny_model_dir, tiny_adapter_dir)
    original = engine.stream_batch

    def slow_stream_batch(*args, **kwargs):
        for texts in original(*args, **kwargs):
            time.sleep(0.3)
            yield texts

    engine.stream_batch = slow_stream_batch
    limits = ServerSettings(votes_path=str(tmp_path / "votes.jsonl"), eval_dir=str(tmp_path / "eval"))
    with serving(build_app(engine, limits)) as url:
        yield url


def test_stop_marks_the_answer_as_stopped_in_chat_and_compare(browser, slow_app_url):
    context, page = _open_page(browser, slow_app_url)
    _ask(page, "Does a stopped answer say that it was stopped?")
    bot = _bot_messages(page).first
    page.wait_for_function("() => { const b = document.querySelector('#chat-conversation .bot-row');"
                           " return b && b.innerText.trim().length > 1 && b.innerText.trim() !== '…'; }")
    page.locator("#chat-stop").click()
    page.get_by_text("(stopped)").first.wait_for()
    time.sleep(1.0)  # nothing generated after Stop overwrites the mark
    assert "(stopped)" in bot.inner_text()
    page.screenshot(path=str(ARTIFACTS / "chat-stopped.png"), full_page=True)

    page.get_by_role("tab", name="Compare").click()
    page.locator("#compare-question textarea").fill("Is a stopped comparison marked?")
    page.get_by_role("button", name="Compare", exact=True).click()
    page.wait_for_function("() => document.querySelector('#compare-base-answer').innerText.trim().length > 1")
    page.locator("#compare-stop").click()
    page.get_by_text("Stopped.").first.wait_for()
    assert "(stopped)" in page.locator("#compare-base-answer").inner_text()
    page.screenshot(path=str(ARTIFACTS / "compare-stopped.png"), full_page=True)
    context.close()


def test_toasts_are_plain_text(browser, tiny_model_dir, tiny_adapter_dir, tmp_path, monkeypatch):
    # A toast renders no Markdown: "**lab-org**" used to appear with its asterisks.
    monkeypatch.setenv("PUBMEDQA_ADMIN_KEY", "owner-key")
    engine = _loaded_tiny_engine(tiny_model_dir, tiny_adapter_dir)
    public = ServerSettings(server_name="0.0.0.0", owner="lab-org", votes_path=str(tmp_path / "votes.jsonl"),
                            eval_dir=str(tmp_path / "eval"))
    with serving(build_app(engine, public)) as url:
        context, page = _open_page(browser, url)
        page.get_by_role("tab", name="Compare").click()
        page.get_by_role("button", name="tie").click()  # a vote before any comparison
        toast = page.locator(".toast-body").first
        toast.wait_for()
        assert "Compare the two models" in toast.inner_text() and "*" not in toast.inner_text()
        page.get_by_role("tab", name="Evaluation").click()
        page.get_by_text("Run a new evaluation").click()
        page.get_by_label("Admin key").fill("wrong-key")
        page.get_by_role("button", name="Run evaluation").click()
        page.get_by_text("Wrong admin key").first.wait_for()
        texts = page.locator(".toast-body").all_inner_texts()
        assert texts and not any("*" in t or "`" in t for t in texts)
        page.screenshot(path=str(ARTIFACTS / "toast-plain.png"), full_page=False)
        context.close()


@pytest.fixture
def evidence_app_url(tiny_model_dir, tiny_adapter_dir, tmp_path, pubmedqa_dir):
    """The app with evidence from the local index of the PubMedQA abstracts (offline)."""
    from pubmedqa.config import EvidenceSettings
    from pubmedqa.evidence import EvidenceSearch

    engine = _loaded_tiny_engine(tiny_model_dir, tiny_adapter_dir)
    search = EvidenceSearch(EvidenceSettings(evidence="local", evidence_local_data=str(pubmedqa_dir)))
    limits = ServerSettings(votes_path=str(tmp_path / "votes.jsonl"), eval_dir=str(tmp_path / "eval"))
    with serving(build_app(engine, limits, search)) as url:
        yield url


def test_a_question_without_an_abstract_shows_the_articles_and_an_answer_citing_a_pmid(
    browser, evidence_app_url, pubmedqa_dir
):
    from pubmedqa.data import load_local

    records = load_local(pubmedqa_dir)
    own, other = "21645374", None
    context, page = _open_page(browser, evidence_app_url)
    _ask(page, records[own].question)  # no abstract; "Find evidence when no abstract is given" is on
    page.locator("#chat-evidence").get_by_text(f"PMID {own}").first.wait_for()
    answer = _wait_answer(page)
    assert f"Source: PMID {own}" in answer
    link = page.locator(f"#chat-conversation a[href='https://pubmed.ncbi.nlm.nih.gov/{own}/']")
    assert link.inner_text() == f"PMID {own}"  # the cited article, one click away
    assert records[own].context[:60] in page.locator("#chat-context textarea").input_value()
    page.screenshot(path=str(ARTIFACTS / "chat-evidence.png"), full_page=True)
    # Another article of the list becomes the context; Compare finds evidence with its own button.
    choice = page.locator("#chat-evidence-choice")
    choice.click()
    options = page.get_by_role("option")
    if options.count() > 1:
        other = options.nth(1).inner_text().split("PMID ")[1].split(":")[0]
        options.nth(1).click()
        page.wait_for_function(
            f"() => document.querySelector('#chat-evidence').innerText.includes('{other}')"
        )
        assert records[own].context[:60] not in page.locator("#chat-context textarea").input_value()
    page.get_by_role("tab", name="Compare").click()
    page.locator("#compare-question textarea").fill(records[own].question)
    page.locator("#compare-find-evidence").click()
    page.locator("#compare-evidence").get_by_text(f"PMID {own}").first.wait_for()
    page.get_by_role("button", name="Compare", exact=True).click()
    for side in ("#compare-base-answer", "#compare-tuned-answer"):
        page.wait_for_function(f"() => document.querySelector('{side}').innerText.includes('Source: PMID {own}')")
    page.screenshot(path=str(ARTIFACTS / "compare-evidence.png"), full_page=True)
    context.close()


@pytest.mark.parametrize("viewport", [{"width": 1280, "height": 900}, PHONE], ids=["1280px", "390px"])
def test_a_thumb_on_a_chat_answer_and_a_compare_vote_show_in_the_human_ratings(
    browser, tiny_model_dir, tiny_adapter_dir, tmp_path, viewport
):
    engine = _loaded_tiny_engine(tiny_model_dir, tiny_adapter_dir)
    limits = ServerSettings(votes_path=str(tmp_path / "votes.jsonl"), eval_dir=str(tmp_path / "eval"))
    with serving(build_app(engine, limits)) as url:
        context, page = _open_page(browser, url, viewport)
        page.locator("#chat-model input[value='fine-tuned']:checked").wait_for()  # chosen once the page loaded
        _ask(page, "Does aspirin reduce the risk of myocardial infarction?")
        _wait_answer(page)
        page.locator("#chat-conversation").get_by_role("button", name="Like", exact=True).first.click()
        page.get_by_role("tab", name="Compare").click()
        page.locator("#compare-question textarea").fill("Is ultrasound as accurate as X-ray for fractures?")
        page.get_by_role("button", name="Compare", exact=True).click()
        page.get_by_text("Model's yes/no/maybe probabilities").first.wait_for()
        page.get_by_role("button", name="fine-tuned better").click()
        page.get_by_text("Vote recorded").first.wait_for()
        page.get_by_role("tab", name="Evaluation").click()
        page.get_by_role("button", name="Reload").click()
        ratings = page.locator("#eval-human-ratings")
        page.wait_for_function("() => document.querySelector('#eval-human-ratings').innerText.includes('Chat, ')")
        text = ratings.inner_text()
        # The Chat opened on the fine-tuned model, the one the app is for.
        assert "fine-tuned preferred in 100% of 1" in text and "Chat, fine-tuned: liked 100% of 1" in text, text
        comparison = page.locator("#eval-comparison").inner_text()
        assert "How sure these figures are" in comparison and "(p = " in comparison
        assert page.locator("#eval-figures").get_by_text("95 % interval").count() >= 1
        ratings.scroll_into_view_if_needed()
        page.screenshot(path=str(ARTIFACTS / f"human-ratings-{viewport['width']}.png"), full_page=False)
        records = [json.loads(line) for line in (tmp_path / "votes.jsonl").read_text().splitlines()]
        assert [(r["kind"], r["vote"]) for r in records] == [("chat", "like"), ("compare", "fine-tuned better")]
        context.close()


def test_retry_undo_and_edit_a_question(page):
    _ask(page, "Does aspirin reduce the risk of myocardial infarction?")
    assert _wait_answer(page)
    conversation = page.locator("#chat-conversation")
    conversation.get_by_role("button", name="Retry", exact=True).click()  # the same question answered again
    _wait_rows(page, 2)
    assert _wait_answer(page)  # a new answer in place of the first, not beside it
    conversation.get_by_role("button", name="Undo", exact=True).click()  # the question taken back into the box
    page.wait_for_function("() => !document.querySelector('#chat-conversation .message-row')")
    assert page.locator("#chat-question textarea").input_value().startswith("Does aspirin reduce")

    _ask(page, "Does aspirin reduce the risk of myocardial infarction?")
    _wait_answer(page)
    user = conversation.locator(".message-row.user-row").first
    user.hover()
    conversation.get_by_role("button", name="Edit", exact=True).first.click()
    box = conversation.locator("textarea").first
    box.fill("Is ultrasound as accurate as X-ray for fractures?")
    conversation.get_by_role("button", name="Submit", exact=True).click()
    page.get_by_text("Is ultrasound as accurate").first.wait_for()
    _wait_rows(page, 2)
    assert _wait_answer(page) and page.get_by_text("Does aspirin reduce").count() == 0
    page.screenshot(path=str(ARTIFACTS / "chat-edited.png"), full_page=True)


@pytest.mark.parametrize("viewport", [{"width": 1280, "height": 900}, PHONE], ids=["1280px", "390px"])
def test_each_answer_shows_its_decision_and_a_reload_keeps_the_conversation_until_new_chat(
    browser, app_url, viewport
):
    context, page = _open_page(browser, app_url, viewport)
    _ask(page, "Does aspirin reduce the risk of myocardial infarction?")
    answer = _wait_answer(page)
    footer = _bot_messages(page).first.locator("blockquote")
    scores = footer.inner_text()
    assert scores.startswith("Decision by option scores:"), answer
    assert all(f"{option} " in scores and "%" in scores for option in ("yes", "no", "maybe"))
    assert footer.locator("strong").count() == 1  # the chosen option in bold

    page.reload()
    page.get_by_text("Model status: Ready").wait_for()
    page.get_by_text("Does aspirin reduce the risk").first.wait_for()
    assert _bot_messages(page).first.inner_text().strip() == answer.strip()
    # The conversation goes on from the kept one: the next answer comes under it, its footer not in the history.
    _ask(page, "Is ultrasound as accurate as X-ray for fractures?")
    _wait_rows(page, 4)
    assert _wait_answer(page, 1)
    page.screenshot(path=str(ARTIFACTS / f"chat-restored-{viewport['width']}.png"), full_page=True)

    page.locator("#chat-clear").click()
    page.wait_for_function("() => !document.querySelector('#chat-conversation .message')")
    page.reload()
    page.get_by_text("Model status: Ready").wait_for()
    time.sleep(1.0)  # the restore runs on load: give it the time to (not) bring anything back
    assert _bot_messages(page).count() == 0
    context.close()
