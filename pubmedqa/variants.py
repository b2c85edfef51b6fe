"""The two model variants and every name they go by, in one table (:data:`NAMES`).

Everywhere in the project a variant is a :class:`Variant`; its value is its one id, ``base`` or ``fine-tuned``: the model
choice on the page and in the /chat API, the key of its answer in a /compare result and in a vote, its name in the
Evaluation charts. Its one label is the heading the page shows over its answer. The other names are kept only
because clients or stored files rely on them:

============  ================  =================  ==============  ===================  ========================
Variant       id (choice,       label (heading)    /v1 model name  also accepted by     key in evaluation files
              /compare key)                                        /v1 (aliases)        (results.json, examples)
============  ================  =================  ==============  ===================  ========================
BASE          ``base``          Base model         pubmedqa-base   ``base``             ``base``
TUNED         ``fine-tuned``    Fine-tuned (LoRA)  pubmedqa-tuned  ``fine-tuned``,      ``tuned``
                                                                   ``tuned``
============  ================  =================  ==============  ===================  ========================

The evaluation files' key is what :mod:`pubmedqa.evaluation.runner` writes and every shipped run under
``assets/eval`` holds (``models.tuned``, ``predictions_tuned.json``); it is a stored format, read as it is.

The engines, the evaluation and the app all go through this module rather than spelling the names out, so the
Chat radio, the /chat, /compare and /v1 APIs, the Compare headings, the evaluation files and the Evaluation labels
cannot drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any


class Variant(str, Enum):
    BASE = "base"
    TUNED = "fine-tuned"


@dataclass(frozen=True)
class VariantNames:
    """What one variant is called where (see the module's table)."""

    label: str  # the heading over its answer on the page
    model_name: str  # its model name in the OpenAI-compatible API (``GET /v1/models``)
    results_key: str  # its key in evaluation run folders (stored files)
    aliases: tuple[str, ...] = ()  # further names the /v1 API accepts for it, besides its id


NAMES: dict[Variant, VariantNames] = {
    Variant.BASE: VariantNames("Base model", "pubmedqa-base", "base"),
    Variant.TUNED: VariantNames("Fine-tuned (LoRA)", "pubmedqa-tuned", "tuned", aliases=("tuned",)),
}

DEFAULT = Variant.BASE  # what an API call without a model choice gets: there whether or not an adapter is loaded
PREFERRED = Variant.TUNED  # what the Chat opens on once the adapter is loaded: the model the app is for
CHOICES: tuple[str, ...] = tuple(variant.value for variant in Variant)
HEADINGS: dict[Variant, str] = {variant: names.label for variant, names in NAMES.items()}
#: Every name the /v1 API accepts for a variant besides its model name: its id and its aliases.
MODEL_ALIASES: dict[str, Variant] = {
    name: variant for variant, names in NAMES.items() for name in (variant.value, *names.aliases)
}
#: An evaluation run's keys (``results.json`` models, ``examples.jsonl``, ``predictions_<key>.json``) -> variant.
RESULTS_KEYS: dict[str, Variant] = {names.results_key: variant for variant, names in NAMES.items()}
BASE_KEY, TUNED_KEY = NAMES[Variant.BASE].results_key, NAMES[Variant.TUNED].results_key
#: An evaluation run's key -> the variant's choice name, as the page labels that variant's figures.
RESULTS_LABELS: dict[str, str] = {key: variant.value for key, variant in RESULTS_KEYS.items()}


def choice(variant: Variant) -> str:
    """The name a user or an API caller uses for ``variant`` (its id); also the key of its answer in a /compare
    result."""
    return variant.value


def from_choice(value: Any) -> Variant | None:
    """The variant a user or an API caller named by its id, or None if ``value`` names none."""
    try:
        return Variant(value)
    except ValueError:
        return None


def from_results_key(key: str) -> Variant | None:
    """The variant an evaluation run's key (``base`` / ``tuned``) stands for, or None."""
    return RESULTS_KEYS.get(key)
