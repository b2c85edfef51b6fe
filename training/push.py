"""Moved to ``python -m scripts.push``; this spelling works until the next release."""
import runpy
import sys

if __name__ == "__main__":
    print("`python -m training.push` is now `python -m scripts.push`;",
          "the old spelling goes in the next release.", file=sys.stderr)
    runpy.run_module("scripts.push", run_name="__main__", alter_sys=True)
