"""FastAPI service: personality-conditioned generation through vLLM with multi-LoRA switching."""
