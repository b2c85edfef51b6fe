"""Hugging Face Space entry point: `python app.py [--help]` serves the PubMedQA chatbot."""

import sys

from app.main import main

if __name__ == "__main__":
    sys.exit(main())
