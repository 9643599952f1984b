"""Evaluation and analysis tools (``python -m muse.eval.<tool>``)."""
