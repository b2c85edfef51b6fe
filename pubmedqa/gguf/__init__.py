"""GGUF files: reading a header (``header``), where a GGUF base comes from (``source``), and a PEFT LoRA
written as a llama.cpp GGUF LoRA (``lora``)."""
