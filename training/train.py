"""Moved to ``python -m scripts.train``; this spelling works until the next release."""
import runpy
import sys

if __name__ == "__main__":
    print("`python -m training.train` is now `python -m scripts.train`;",
          "the old spelling goes in the next release.", file=sys.stderr)
    runpy.run_module("scripts.train", run_name="__main__", alter_sys=True)
