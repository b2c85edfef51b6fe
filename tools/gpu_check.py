"""Moved to ``python -m scripts.gpu_check``; this spelling works until the next release."""
import runpy
import sys

if __name__ == "__main__":
    print("`python -m tools.gpu_check` is now `python -m scripts.gpu_check`;",
          "the old spelling goes in the next release.", file=sys.stderr)
    runpy.run_module("scripts.gpu_check", run_name="__main__", alter_sys=True)
