"""Evaluate the base model and the fine-tuned one on the official PubMedQA test set (the run itself is
:func:`pubmedqa.evaluation.runner.evaluate`).

    python -m scripts.evaluate                          # all 500 test questions, shipped adapter
    python -m scripts.evaluate --limit 100 --output_dir outputs/eval-100
    python -m scripts.evaluate --judge_base_url http://localhost:8000/v1 --judge_model Qwen/Qwen2.5-7B-Instruct
"""

from __future__ import annotations

import logging
import sys
from typing import Sequence

from pubmedqa.config import ModelSettings, parse_settings
from pubmedqa.data import DataFormatError
from pubmedqa.evaluation.runner import EvalArguments, evaluate
from pubmedqa.model_loading import ModelLoadError

logger = logging.getLogger("scripts.evaluate")


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        model_settings, args = parse_settings([ModelSettings, EvalArguments], argv)
        evaluate(model_settings, args)
    except (DataFormatError, ModelLoadError, ValueError) as exc:
        logger.error("%s", exc)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
