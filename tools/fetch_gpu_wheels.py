"""Moved to ``python -m scripts.fetch_gpu_wheels``; this spelling works until the next release."""

if __name__ == "__main__":
    from scripts.moved import run_moved

    run_moved("tools.fetch_gpu_wheels", "scripts.fetch_gpu_wheels")
