"""Moved to ``python -m scripts.export``; this spelling works until the next release."""
import runpy
import sys

if __name__ == "__main__":
    print("`python -m training.export` is now `python -m scripts.export`;",
          "the old spelling goes in the next release.", file=sys.stderr)
    runpy.run_module("scripts.export", run_name="__main__", alter_sys=True)
