"""Personas: the adapter registry and what a client's persona resolves to on the engine.

Imports :mod:`big5engine` and :mod:`big5core`; the edges (service, evaluator, trainer) import it.
"""
