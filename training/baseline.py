"""Moved to ``python -m scripts.baseline``; this spelling works until the next release."""
import runpy
import sys

if __name__ == "__main__":
    print("`python -m training.baseline` is now `python -m scripts.baseline`;",
          "the old spelling goes in the next release.", file=sys.stderr)
    runpy.run_module("scripts.baseline", run_name="__main__", alter_sys=True)
