"""The language model (Qwen3) on megatron-core."""

from megatron_finevit.models.llm.qwen3 import build_qwen3

__all__ = ["build_qwen3"]
