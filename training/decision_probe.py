"""Moved to ``python -m scripts.decision_probe``; this spelling works until the next release."""
import runpy
import sys

if __name__ == "__main__":
    print("`python -m training.decision_probe` is now `python -m scripts.decision_probe`;",
          "the old spelling goes in the next release.", file=sys.stderr)
    runpy.run_module("scripts.decision_probe", run_name="__main__", alter_sys=True)
