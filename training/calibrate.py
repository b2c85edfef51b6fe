"""Moved to ``python -m scripts.calibrate``; this spelling works until the next release."""
import runpy
import sys

if __name__ == "__main__":
    print("`python -m training.calibrate` is now `python -m scripts.calibrate`;",
          "the old spelling goes in the next release.", file=sys.stderr)
    runpy.run_module("scripts.calibrate", run_name="__main__", alter_sys=True)
