"""Moved to ``python -m scripts.fetch_gpu_wheels``; this spelling works until the next release."""
import runpy
import sys

if __name__ == "__main__":
    print("`python -m tools.fetch_gpu_wheels` is now `python -m scripts.fetch_gpu_wheels`;",
          "the old spelling goes in the next release.", file=sys.stderr)
    runpy.run_module("scripts.fetch_gpu_wheels", run_name="__main__", alter_sys=True)
