"""The MCP server on the app's port, as an MCP client (the `mcp` package, streamable HTTP) uses it: the tool list,
a call of each tool, and tool errors (never a crash) for bad calls; per-visitor names across Gradio's loopback."""

from __future__ import annotations

import asyncio
import json

import pytest

pytest.importorskip("mcp")
from mcp import ClientSession  # noqa: E402
from mcp.client.streamable_http import streamablehttp_client  # noqa: E402

from app.mcp_bridge import VISITOR_HEADER, _signed, bridged_visitor  # noqa: E402
from app.openai_api import API_KEY_ENV  # noqa: E402
from tests.test_openai_api import _engine, app_server  # noqa: E402

TOOLS = {"answer_question", "compare_models", "find_evidence"}


@pytest.fixture(scope="module")
def root(tiny_model_dir, tiny_adapter_dir):
    engine = _engine(tiny_model_dir, tiny_adapter_dir)
    engine.load()
    with app_server(engine) as (root, _):
        yield root


async def _session_calls(root: str, calls: list[tuple[str, dict]], headers: dict | None = None):
    async with streamablehttp_client(f"{root}/gradio_api/mcp/", headers=headers) as (read, write, _):
        async with ClientSession(read, write) as session:
            await session.initialize()
            tools = (await session.list_tools()).tools
            return tools, [await session.call_tool(name, args) for name, args in calls]


def _run(root, calls, headers=None):
    return asyncio.run(_session_calls(root, calls, headers))


def _text(result) -> str:
    return "".join(getattr(part, "text", "") for part in result.content)


def test_the_tools_are_listed_with_their_arguments_described_and_nothing_internal(root):
    tools, _ = _run(root, [])
    assert {tool.name for tool in tools} == TOOLS  # not /chat, not the page's events
    answer = next(tool for tool in tools if tool.name == "answer_question")
    assert "biomedical" in answer.description
    properties = answer.inputSchema["properties"]
    assert {"question", "abstract", "model", "evidence"} <= set(properties)
    assert "fine-tuned" in properties["model"]["description"] and properties["question"]["description"]
    assert answer.inputSchema["required"] == ["question"]


def test_each_tool_answers_and_bad_calls_are_tool_errors(root):
    question = "Do statins reduce mortality after stroke?"
    calls = [
        ("answer_question", {"question": question, "abstract": "Statins were given.", "model": "fine-tuned",
                             "evidence": "off", "max_new_tokens": 8}),
        ("compare_models", {"question": question, "max_new_tokens": 6}),
        ("find_evidence", {"question": question}),
        ("answer_question", {"question": "   "}),
        ("answer_question", {"question": question, "abstract": "x" * 1_000_000}),
        ("answer_question", {"question": question, "model": "gpt-9"}),
    ]
    _, (answer, compare, found, empty, huge, wrong_model) = _run(root, calls)
    assert not answer.isError, _text(answer)
    result = json.loads(_text(answer))
    assert result["model"] == "fine-tuned" and result["decision"] in {"yes", "no", "maybe"}
    assert set(result["probabilities"]) == {"yes", "no", "maybe"}
    assert abs(sum(result["probabilities"].values()) - 1) < 1e-3
    assert not compare.isError and {"base", "fine-tuned"} <= set(json.loads(_text(compare)))
    assert found.isError and "evidence search is off" in _text(found).lower()  # this app has no search
    for bad, words in ((empty, "question"), (huge, "characters"), (wrong_model, "model")):
        assert bad.isError and words in _text(bad).lower(), _text(bad)
    _, (again,) = _run(root, [("answer_question", {"question": question, "model": "base", "max_new_tokens": 4})])
    assert not again.isError and json.loads(_text(again))["model"] == "base"  # the server kept serving


def test_a_wrong_key_is_a_tool_error(monkeypatch, tiny_model_dir, tiny_adapter_dir):
    monkeypatch.setenv(API_KEY_ENV, "right-key")
    engine = _engine(tiny_model_dir, tiny_adapter_dir)
    with app_server(engine) as (other, _):
        call = [("answer_question", {"question": "Is it?", "evidence": "off", "max_new_tokens": 2})]
        _, (refused,) = _run(other, call, {"Authorization": "Bearer wrong"})
        _, (allowed,) = _run(other, call, {"Authorization": "Bearer right-key"})
    assert refused.isError and "key" in _text(refused).lower()
    assert not allowed.isError, _text(allowed)


class _Request:
    def __init__(self, headers, host):
        self.headers, self.client = headers, type("Client", (), {"host": host})()


def test_the_bridged_visitor_cannot_be_written_by_a_client():
    assert bridged_visitor(_Request({VISITOR_HEADER: _signed("ip:10.0.0.7")}, "127.0.0.1")) == "ip:10.0.0.7"
    assert bridged_visitor(_Request({VISITOR_HEADER: _signed("ip:10.0.0.7")}, "10.0.0.9")) is None  # not loopback
    assert bridged_visitor(_Request({VISITOR_HEADER: "ip:10.0.0.7|" + "0" * 64}, "127.0.0.1")) is None  # forged
    assert bridged_visitor(_Request({}, "127.0.0.1")) is None


def test_per_visitor_limits_apply_to_mcp_calls_as_to_the_page(monkeypatch, tiny_model_dir, tiny_adapter_dir):
    """On a Space (its proxy appends the visitor's address): one visitor's second comparison within the minute is
    refused as a tool error, another visitor's goes through."""
    from dataclasses import replace

    from tests.test_openai_api import LIMITS

    monkeypatch.setenv("SPACE_ID", "someone/pubmedqa")
    limits = replace(LIMITS, heavy_per_minute=1, trusted_proxy_hops=1)
    compare = [("compare_models", {"question": "Do statins help?", "max_new_tokens": 2})]
    engine = _engine(tiny_model_dir, tiny_adapter_dir)
    with app_server(engine, limits) as (space, _):
        _, (first,) = _run(space, compare, {"X-Forwarded-For": "1.2.3.4, 10.0.0.1"})
        _, (second,) = _run(space, compare, {"X-Forwarded-For": "9.9.9.9, 10.0.0.1"})  # same hop: the same visitor
        _, (other,) = _run(space, compare, {"X-Forwarded-For": "10.0.0.2"})
    assert not first.isError, _text(first)
    assert second.isError and "a minute per visitor" in _text(second), _text(second)
    assert not other.isError, _text(other)
