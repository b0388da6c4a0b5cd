"""Shared vocabulary of the BIG5-CHAT stack: traits, prompts, settings, storage."""
