"""Moved to ``python -m scripts.gpu_check``; this spelling works until the next release."""

if __name__ == "__main__":
    from scripts.moved import run_moved

    run_moved("tools.gpu_check", "scripts.gpu_check")
