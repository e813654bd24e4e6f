"""saft-filter: drop harmful fine-tuning samples by their projection onto a subspace of an LLM's hidden states."""

__version__ = "0.1.0"
