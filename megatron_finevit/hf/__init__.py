"""transformers classes for exported FineViT / FineViT-VL checkpoints.

Importing this package registers them with ``AutoConfig`` / ``AutoModel`` (and FineViT-VL with
``AutoModelForImageTextToText``), so after ``import megatron_finevit.hf`` a directory written by
``tools/convert_checkpoint.py mcore-to-hf --model finevit`` loads with
``AutoModel.from_pretrained(dir)`` — no ``trust_remote_code``.
"""

from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText

from megatron_finevit.hf.configuration_finevit import FineViTHFConfig, FineViTVLHFConfig
from megatron_finevit.hf.modeling_finevit import FineViTHFModel
from megatron_finevit.hf.modeling_finevit_vl import (
    FineViTMergeProjector,
    FineViTVLForConditionalGeneration,
)

AutoConfig.register(FineViTHFConfig.model_type, FineViTHFConfig, exist_ok=True)
AutoConfig.register(FineViTVLHFConfig.model_type, FineViTVLHFConfig, exist_ok=True)
AutoModel.register(FineViTHFConfig, FineViTHFModel, exist_ok=True)
AutoModel.register(FineViTVLHFConfig, FineViTVLForConditionalGeneration, exist_ok=True)
AutoModelForImageTextToText.register(FineViTVLHFConfig, FineViTVLForConditionalGeneration,
                                     exist_ok=True)

__all__ = ["FineViTHFConfig", "FineViTVLHFConfig", "FineViTHFModel", "FineViTMergeProjector",
           "FineViTVLForConditionalGeneration"]
