"""The PubMedQA evaluation: metrics, BERTScore, the LLM judge, the run folder schema, and the run itself."""
