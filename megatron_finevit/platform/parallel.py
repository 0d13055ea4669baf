"""megatron parallel_state initialisation with validation before any compute."""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist


@dataclass(frozen=True)
class ParallelConfig:
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    context_parallel: int = 1
    sequence_parallel: bool = False
    virtual_pipeline: int | None = None

    @property
    def model_parallel(self) -> int:
        return self.tensor_parallel * self.pipeline_parallel * self.context_parallel

    def data_parallel(self, world_size: int) -> int:
        return world_size // self.model_parallel

    def validate(self, world_size: int, num_attention_heads: int | None = None,
                 num_query_groups: int | None = None, num_layers: int | None = None) -> None:
        """Raise ValueError with every problem found, before any process group exists."""
        problems = self.problems(world_size, num_attention_heads, num_query_groups, num_layers)
        if problems:
            raise ValueError("invalid parallel config: " + "; ".join(problems))

    def problems(self, world_size: int, num_attention_heads: int | None = None,
                 num_query_groups: int | None = None, num_layers: int | None = None) -> list[str]:
        """One line per problem of this layout on ``world_size`` ranks (and the model dims)."""
        problems = []
        for name in ("tensor_parallel", "pipeline_parallel", "context_parallel"):
            if getattr(self, name) < 1:
                problems.append(f"{name}={getattr(self, name)} must be >= 1")
        if problems:
            return problems
        if world_size % self.model_parallel:
            problems.append(
                f"world size {world_size} is not divisible by tensor_parallel x pipeline_parallel x "
                f"context_parallel = {self.tensor_parallel} x {self.pipeline_parallel} x "
                f"{self.context_parallel} = {self.model_parallel}")
        if self.sequence_parallel and self.tensor_parallel == 1:
            problems.append("sequence_parallel needs tensor_parallel > 1")
        if self.virtual_pipeline is not None and self.pipeline_parallel == 1:
            problems.append("virtual_pipeline needs pipeline_parallel > 1")
        if num_attention_heads is not None and num_attention_heads % self.tensor_parallel:
            problems.append(f"tensor_parallel={self.tensor_parallel} does not divide "
                            f"num_attention_heads={num_attention_heads}")
        if num_query_groups is not None and num_query_groups % self.tensor_parallel:
            problems.append(f"tensor_parallel={self.tensor_parallel} does not divide "
                            f"num_query_groups={num_query_groups}")
        if num_layers is not None:
            stages = self.pipeline_parallel * (self.virtual_pipeline or 1)
            if num_layers < stages:
                problems.append(f"num_layers={num_layers} is fewer than the {stages} pipeline stages")
        return problems


def init_parallel(config: ParallelConfig, **model_dims) -> None:
    """Validate ``config`` against the world (and model dims, if given) and build megatron's
    process groups. torch.distributed must already be initialised."""
    from megatron.core import parallel_state

    if not dist.is_initialized():
        raise RuntimeError("call platform.init_distributed() before init_parallel()")
    config.validate(dist.get_world_size(), **model_dims)
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=config.tensor_parallel,
        pipeline_model_parallel_size=config.pipeline_parallel,
        virtual_pipeline_model_parallel_size=config.virtual_pipeline,
        context_parallel_size=config.context_parallel,
    )


def destroy_parallel() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
