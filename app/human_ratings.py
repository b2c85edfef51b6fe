"""The human counterpart of the LLM judge: what people said of the answers, from the votes file (:mod:`app.votes`).
Compare votes as fine-tuned's win rate over base among the decisive votes (ties and "both bad" counted apart), the
Chat's like-rate per variant, each with a 95 % Wilson interval (SciPy), the counts and the time span."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import pandas as pd
from scipy import stats

from app.votes import RATING_CHOICES, VOTE_CHOICES
from pubmedqa import variants
from pubmedqa.variants import Variant

BASE_BETTER, TUNED_BETTER, TIE, BOTH_BAD = VOTE_CHOICES
LIKE, DISLIKE = RATING_CHOICES


@dataclass(frozen=True)
class Rate:
    """``hits`` of ``n`` with the 95 % Wilson interval of their share."""

    hits: int
    n: int

    @property
    def share(self) -> float:
        return self.hits / self.n if self.n else 0.0

    @property
    def interval(self) -> tuple[float, float]:
        if not self.n:
            return 0.0, 1.0
        found = stats.binomtest(self.hits, self.n).proportion_ci(confidence_level=0.95, method="wilson")
        return float(found.low), float(found.high)

    def words(self) -> str:
        low, high = self.interval
        return f"{self.share:.0%} of {self.n} (95 % interval {low:.0%}–{high:.0%})"


@dataclass(frozen=True)
class HumanRatings:
    votes: Counter[str]  # Compare votes by choice
    likes: dict[str, Rate]  # Chat likes per variant id
    first: str | None  # the oldest and the newest rating's time (UTC, ISO)
    last: str | None

    @property
    def win_rate(self) -> Rate:
        """Fine-tuned preferred among the votes that prefer one of the two."""
        return Rate(self.votes[TUNED_BETTER], self.votes[TUNED_BETTER] + self.votes[BASE_BETTER])


def summarize(records: list[dict[str, Any]]) -> HumanRatings:
    """The ratings of ``records`` (as :meth:`app.votes.VoteLog.records` gives them)."""
    votes = Counter(r["vote"] for r in records if r.get("kind", "compare") == "compare" and r["vote"] in VOTE_CHOICES)
    chat = [r for r in records if r.get("kind") == "chat" and r["vote"] in RATING_CHOICES]
    likes = {}
    for variant in Variant:
        rated = [r for r in chat if r.get("variant") == variants.choice(variant)]
        if rated:
            likes[variants.choice(variant)] = Rate(sum(r["vote"] == LIKE for r in rated), len(rated))
    times = sorted(str(r["timestamp"]) for r in records if isinstance(r.get("timestamp"), str))
    return HumanRatings(votes, likes, times[0] if times else None, times[-1] if times else None)


def ratings_markdown(ratings: HumanRatings) -> str:
    """The dashboard's "Human ratings" section."""
    lines = ["**Human ratings** (from the Compare votes and the Chat's thumbs; next to the LLM judge's grades)"]
    total = sum(ratings.votes.values())
    if total:
        win = ratings.win_rate
        decided = (f"fine-tuned preferred in {win.words()} votes that chose one" if win.n
                   else "no vote preferred one of the two")
        lines.append(f"- **Compare** ({total} vote{'s' if total != 1 else ''}): {decided}; {ratings.votes[TIE]} "
                     f"tie{'s' if ratings.votes[TIE] != 1 else ''}, {ratings.votes[BOTH_BAD]} both bad.")
    else:
        lines.append("- **Compare**: no votes yet (vote under a comparison in the Compare tab).")
    if ratings.likes:
        for variant, rate in ratings.likes.items():
            lines.append(f"- **Chat, {variant}**: liked {rate.words()} rated answers.")
    else:
        lines.append("- **Chat**: no answer rated yet (the thumbs under each answer).")
    if ratings.first:
        lines.append(f"- From {ratings.first[:16].replace('T', ' ')} to {ratings.last[:16].replace('T', ' ')} UTC.")
    return "\n".join(lines)


def ratings_frame(records: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per rating, for the owner's CSV: when, what, on which question and answer."""
    rows = []
    for r in records:
        answers = r.get("answers") if isinstance(r.get("answers"), dict) else {}
        rows.append({
            "time": r.get("timestamp"), "kind": r.get("kind", "compare"), "rating": r.get("vote"),
            "variant": r.get("variant", ""), "decision": r.get("decision", ""), "question": r.get("question", ""),
            "answer": r.get("answer", ""), "base answer": answers.get(variants.choice(Variant.BASE), ""),
            "fine-tuned answer": answers.get(variants.choice(Variant.TUNED), ""), "comment": r.get("comment", ""),
        })
    return pd.DataFrame(rows)
