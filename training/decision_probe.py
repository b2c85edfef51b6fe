"""Moved to ``python -m scripts.decision_probe``; this spelling works until the next release."""

if __name__ == "__main__":
    from scripts.moved import run_moved

    run_moved("training.decision_probe", "scripts.decision_probe")
