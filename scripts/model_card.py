"""Rewrite an adapter folder's model card from its own files (``python -m scripts.model_card DIR``), e.g. after
``scripts.calibrate`` or with an evaluation run's results (``--results RUN_DIR``)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Sequence

from pubmedqa.adapter import Adapter, AdapterError
from pubmedqa.decisions.calibration import load_calibration
from pubmedqa.decisions.probe import load_probe
from pubmedqa.evaluation.results import ResultsError, load_results
from training.model_card import write_model_card

logger = logging.getLogger("scripts.model_card")


def main(argv: Sequence[str] | None = None) -> int:
    """Rewrite an adapter folder's card from its own files, e.g. after `scripts.calibrate` or an evaluation run."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("adapter_dir", type=Path)
    parser.add_argument("--results", type=Path, help="An evaluation run folder whose results.json goes on the card.")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        run = json.loads((args.adapter_dir / "training_args.json").read_text())
        dev = json.loads((args.adapter_dir / "dev_metrics.json").read_text())
        results = load_results(args.results).results if args.results else None
        adapter = Adapter.resolve(str(args.adapter_dir))
    except (OSError, json.JSONDecodeError, ResultsError, AdapterError) as exc:
        logger.error("Cannot write the card: %s", exc)
        return 2
    path = write_model_card(args.adapter_dir, run, dev["before_training"], dev["after_training"],
                            load_calibration(adapter), results, load_probe(adapter))
    logger.info("Wrote %s", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
