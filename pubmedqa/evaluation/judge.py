"""LLM-as-a-judge: a reference-guided 1-5 grade of each long answer, from any OpenAI-compatible endpoint (vLLM, TGI,
OpenAI, Hugging Face Inference Providers) through the ``openai`` client, at temperature 0. (``huggingface_hub``'s
client refuses every URL when HF_HUB_OFFLINE is set, even a judge on localhost.)

An unreachable endpoint or an unparseable reply is recorded as a failure for that example, never as a score.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)

RUBRIC = """You grade answers to biomedical research questions against a reference answer written by experts.
Score the candidate from 1 to 5:
5 = same decision (yes/no/maybe) as the reference and a correct, well-supported explanation;
4 = same decision, explanation mostly correct but incomplete;
3 = same decision but a weak or partly wrong explanation, or a hedged decision with a good explanation;
2 = different decision, or an explanation that contradicts the reference;
1 = wrong, irrelevant or empty.
Reply with JSON only: {"score": <1-5>, "reason": "<one sentence>"}"""


@dataclass(frozen=True)
class Grade:
    score: int | None
    reason: str = ""
    error: str | None = None


def grading_messages(question: str, reference: str, candidate: str) -> list[dict[str, str]]:
    return [
        {"role": "system", "content": RUBRIC},
        {
            "role": "user",
            "content": f"Question: {question}\n\nReference answer: {reference}\n\nCandidate answer: {candidate}",
        },
    ]


_SCORE_PATTERNS = [
    re.compile(r'"score"\s*:\s*"?([1-5])\b'),
    re.compile(r"\bscore\s*(?:is|=|:)?\s*\**\s*([1-5])\b", re.IGNORECASE),
    re.compile(r"^\s*\**([1-5])\s*(?:/\s*5)?\**\s*(?:$|[.\n:-])"),
]


def parse_grade(reply: str) -> Grade:
    """The score in a judge reply (JSON first, then common free-text forms); a failure when there is none."""
    text = (reply or "").strip()
    try:
        data = json.loads(re.sub(r"^```(?:json)?|```$", "", text).strip())
        if isinstance(data, dict) and int(data.get("score")) in range(1, 6):
            return Grade(int(data["score"]), str(data.get("reason", "")))
    except (ValueError, TypeError):
        pass
    for pattern in _SCORE_PATTERNS:
        match = pattern.search(text)
        if match:
            return Grade(int(match.group(1)), text[:300])
    return Grade(None, error=f"unparseable judge reply: {text[:120]!r}")


class Judge:
    """Grades answers through an OpenAI-compatible chat endpoint."""

    def __init__(self, base_url: str, model: str, api_key: str | None = None, timeout: float = 60.0):
        from openai import OpenAI

        self.model = model
        # Local servers (vLLM, TGI) accept any key; the client insists on one.
        self._client = OpenAI(base_url=base_url, api_key=api_key or "not-needed", timeout=timeout, max_retries=1)

    def grade(self, question: str, reference: str, candidate: str) -> Grade:
        try:
            response = self._client.chat.completions.create(
                messages=grading_messages(question, reference, candidate), model=self.model, temperature=0.0, max_tokens=200
            )
            reply = response.choices[0].message.content
        except Exception as exc:  # endpoint down, timeout, HTTP error: this example fails, the run goes on
            return Grade(None, error=f"judge request failed ({type(exc).__name__})")
        return parse_grade(reply)


def summarize_grades(grades: list[Grade]) -> dict[str, Any]:
    scores = [g.score for g in grades if g.score is not None]
    return {
        "enabled": True,
        "mean": sum(scores) / len(scores) if scores else None,
        "distribution": {str(k): scores.count(k) for k in range(1, 6)},
        "graded": len(scores),
        "failures": len(grades) - len(scores),
    }
