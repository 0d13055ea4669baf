"""Checkpoint conversion between Hugging Face and megatron formats (see registry.py)."""
