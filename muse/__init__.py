"""MUSE tokenizer."""
