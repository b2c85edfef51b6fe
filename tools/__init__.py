"""The old spellings of ``scripts.gpu_check`` and ``scripts.fetch_gpu_wheels``, kept for one release."""
