"""megatron_finevit: Megatron-core training codebase for FineViT."""
