"""Moved to ``python -m scripts.deploy``; this spelling works until the next release."""
import runpy
import sys

if __name__ == "__main__":
    print("`python -m training.deploy` is now `python -m scripts.deploy`;",
          "the old spelling goes in the next release.", file=sys.stderr)
    runpy.run_module("scripts.deploy", run_name="__main__", alter_sys=True)
