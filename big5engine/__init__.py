"""The generation runtime: vLLM on its own loop thread, scoring, LoRA, composition, base models.

Imports :mod:`big5core` only; knows nothing of personas, the registry or the edges above it.
"""
