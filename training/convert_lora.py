"""Moved to ``python -m scripts.convert_lora``; this spelling works until the next release."""

if __name__ == "__main__":
    from scripts.moved import run_moved

    run_moved("training.convert_lora", "scripts.convert_lora")
