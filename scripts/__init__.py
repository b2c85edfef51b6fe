"""The commands: ``python -m scripts.<name>`` trains, evaluates, calibrates, exports, pushes and deploys (each one
a thin line over the library in ``pubmedqa/`` and ``training/``; ``--help`` lists its settings)."""
