"""Moved to ``python -m scripts.deploy``; this spelling works until the next release."""

if __name__ == "__main__":
    from scripts.moved import run_moved

    run_moved("training.deploy", "scripts.deploy")
