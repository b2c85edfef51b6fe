"""Moved to ``python -m scripts.evaluate``; this spelling works until the next release."""
import runpy
import sys

if __name__ == "__main__":
    print("`python -m training.evaluate` is now `python -m scripts.evaluate`;",
          "the old spelling goes in the next release.", file=sys.stderr)
    runpy.run_module("scripts.evaluate", run_name="__main__", alter_sys=True)
