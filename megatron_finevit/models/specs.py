"""Layer specs: one transformer layer layout, two backends.

Every transformer in the project (FineViT, the SigLIP2 text tower, Qwen3) is a megatron
``TransformerLayer`` built from a ``ModuleSpec``. The ``local`` and ``te`` backends differ only in
which classes fill the submodules (megatron-core's spec pattern):

| submodule            | local (torch; CPU-testable)           | te (TransformerEngine; GPU, FP8)          |
|----------------------|---------------------------------------|-------------------------------------------|
| input norm + QKV     | TorchNorm, then ColumnParallelLinear  | TELayerNormColumnParallelLinear (fused)   |
| core attention       | PackedCoreAttention (THD, CP; ours)   | TEDotProductAttention (THD, CP)           |
| output projection    | RowParallelLinear                     | TERowParallelLinear                       |
| q/k norm             | TorchNorm                             | TENorm                                    |
| MLP norm + fc1       | TorchNorm, then ColumnParallelLinear  | TELayerNormColumnParallelLinear (fused)   |
| fc2                  | RowParallelLinear                     | TERowParallelLinear                       |

Each model config chooses its backend (``spec_backend``; FP8 only with ``te``): FineViT, the text
tower and Qwen3 alike. Both backends save the same checkpoint keys — TE's, where the norm is fused
into the next linear (``LOCAL_TO_TE_CHECKPOINT_KEYS``; pinned in ``tests/models/test_spec_keys``).
The ``te`` backend is not exercised in CI (TransformerEngine cannot be installed on the CPU
machines); choosing it without TE installed fails at config time with ``BackendUnavailable``.
"""

from __future__ import annotations

from megatron.core.models.backends import LocalSpecProvider
from megatron.core.models.gpt.gpt_layer_specs import get_mlp_module_spec_for_backend
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add

from megatron_finevit.models.norms import TorchNorm

BACKENDS = ("local", "te")


class BackendUnavailable(RuntimeError):
    """The configured layer-spec backend cannot be used on this machine."""


class FineViTLocalSpecProvider(LocalSpecProvider):
    """megatron's local provider with our norm (sequence-parallel capable) and our packed /
    context-parallel core attention."""

    def layer_norm(self, rms_norm: bool = False, for_qk: bool = False, has_residual: bool = False):
        return TorchNorm

    def core_attention(self) -> type:
        from megatron_finevit.models.attention import PackedCoreAttention

        return PackedCoreAttention


def require_transformer_engine() -> None:
    """Raise ``BackendUnavailable`` with an actionable message when TE is missing."""
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception as exc:  # ImportError, or a CUDA/driver error raised at import
        raise BackendUnavailable(
            "spec backend 'te' needs TransformerEngine (GPU machines: pip install -e .[gpu]); "
            f"importing it failed: {exc!r}. Use backend 'local' on CPU."
        ) from exc


def spec_provider(backend: str):
    """The megatron ``BackendSpecProvider`` for ``backend`` ('local' or 'te')."""
    if backend == "local":
        return FineViTLocalSpecProvider()
    if backend == "te":
        require_transformer_engine()
        from megatron.core.extensions.transformer_engine_spec_provider import TESpecProvider

        return TESpecProvider()
    raise ValueError(f"spec backend must be one of {BACKENDS}, got {backend!r}")


# The local spec's separate norms under the names TE's fused norm+linear layers give them, so a
# checkpoint is the same for both backends (megatron's own local GPT spec does this too).
LOCAL_TO_TE_CHECKPOINT_KEYS = {
    "input_layernorm.": "self_attention.linear_qkv.layer_norm_",
    "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_",
}


def transformer_layer_spec(backend: str, attn_mask_type: AttnMaskType, qk_layernorm: bool,
                           normalization: str) -> ModuleSpec:
    """One pre-norm transformer layer (attention + MLP; the MLP is gated when the config says
    ``gated_linear_unit``). Checkpoint keys are TE's for both backends."""
    provider = spec_provider(backend)
    rms = normalization == "RMSNorm"
    fused_norm = provider.fuse_layernorm_and_linear()
    norm = provider.layer_norm(rms_norm=rms, for_qk=False, has_residual=True)
    qk_norm = provider.layer_norm(rms_norm=rms, for_qk=True) if qk_layernorm else IdentityOp
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=IdentityOp if fused_norm else norm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": attn_mask_type},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=(provider.column_parallel_layer_norm_linear() if fused_norm
                                else provider.column_parallel_linear()),
                    core_attention=provider.core_attention(),
                    linear_proj=provider.row_parallel_linear(),
                    q_layernorm=qk_norm,
                    k_layernorm=qk_norm,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=IdentityOp if fused_norm else norm,
            mlp=get_mlp_module_spec_for_backend(backend=provider),
            mlp_bda=get_bias_dropout_add,
            sharded_state_dict_keys_map={} if fused_norm else dict(LOCAL_TO_TE_CHECKPOINT_KEYS),
        ),
    )


def transformer_block_spec(config, backend: str, attn_mask_type: AttnMaskType,
                           qk_layernorm: bool = False, final_norm: bool = True,
                           vp_stage: int | None = None) -> TransformerBlockSubmodules:
    """This pipeline stage's layers (megatron's TransformerBlock builds exactly the specs given)
    and the final norm."""
    layer = transformer_layer_spec(backend, attn_mask_type, qk_layernorm, config.normalization)
    provider = spec_provider(backend)
    norm = provider.layer_norm(rms_norm=config.normalization == "RMSNorm", for_qk=False)
    return TransformerBlockSubmodules(
        layer_specs=[layer] * get_num_layers_to_build(config, vp_stage=vp_stage),
        layer_norm=norm if final_norm else None,
    )
