"""saft-filter: drop harmful fine-tuning samples by their projection onto a subspace of an LLM's hidden states.

Owns: the package version (``__version__``). Must not: import anything: every ``app.*`` import runs this module
first, so it stays free of the model, torch, Redis and the settings.
"""

__version__ = "0.1.0"
