"""Moved to ``python -m scripts.convert_lora``; this spelling works until the next release."""
import runpy
import sys

if __name__ == "__main__":
    print("`python -m training.convert_lora` is now `python -m scripts.convert_lora`;",
          "the old spelling goes in the next release.", file=sys.stderr)
    runpy.run_module("scripts.convert_lora", run_name="__main__", alter_sys=True)
