"""The two model variants as the app names them: the choice a user or an API caller sends ("base" / "fine-tuned")
and the heading the UI shows over an answer.

Everything in app/ goes through this module rather than spelling the names out, so the Chat radio, the /chat and
/compare APIs and the Compare headings cannot drift apart. (Result files of training/ and pubmedqa/evaluation key
the variants "base" / "tuned"; that naming belongs to them.)
"""

from __future__ import annotations

from typing import Any

from pubmedqa.backends.base import Variant

DEFAULT = Variant.BASE
CHOICES: tuple[str, ...] = tuple(variant.value for variant in Variant)
HEADINGS: dict[Variant, str] = {Variant.BASE: "Base model", Variant.TUNED: "Fine-tuned (LoRA)"}


def choice(variant: Variant) -> str:
    """The name a user or an API caller uses for ``variant``; also the key of its answer in a /compare result."""
    return variant.value


def from_choice(value: Any) -> Variant | None:
    """The variant a user or an API caller named, or None if ``value`` names none."""
    try:
        return Variant(value)
    except ValueError:
        return None
