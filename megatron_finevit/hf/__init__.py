"""transformers classes for exported FineViT / FineViT-VL checkpoints.

Importing this package registers them with ``AutoConfig`` / ``AutoModel`` (and FineViT-VL with
``AutoModelForImageTextToText``, its processor with ``AutoProcessor`` and its image processor with
``AutoImageProcessor``), so after ``import megatron_finevit.hf`` a directory written by
``tools/convert_checkpoint.py mcore-to-hf --model finevit`` loads with
``AutoModel.from_pretrained(dir)`` — no ``trust_remote_code``.
"""

from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageTextToText,
    AutoProcessor,
)

from megatron_finevit.hf.configuration_finevit import FineViTHFConfig, FineViTVLHFConfig
from megatron_finevit.hf.image_processing_finevit import FineViTImageProcessor
from megatron_finevit.hf.modeling_finevit import FineViTHFModel
from megatron_finevit.hf.modeling_finevit_vl import (
    FineViTMergeProjector,
    FineViTVLForConditionalGeneration,
)
from megatron_finevit.hf.processing_finevit_vl import FineViTVLProcessor

AutoConfig.register(FineViTHFConfig.model_type, FineViTHFConfig, exist_ok=True)
AutoConfig.register(FineViTVLHFConfig.model_type, FineViTVLHFConfig, exist_ok=True)
AutoModel.register(FineViTHFConfig, FineViTHFModel, exist_ok=True)
AutoModel.register(FineViTVLHFConfig, FineViTVLForConditionalGeneration, exist_ok=True)
AutoModelForImageTextToText.register(FineViTVLHFConfig, FineViTVLForConditionalGeneration,
                                     exist_ok=True)
AutoImageProcessor.register(FineViTVLHFConfig,
                            image_processor_classes={"pil": FineViTImageProcessor}, exist_ok=True)
AutoProcessor.register(FineViTVLHFConfig, FineViTVLProcessor, exist_ok=True)

__all__ = ["FineViTHFConfig", "FineViTVLHFConfig", "FineViTHFModel", "FineViTMergeProjector",
           "FineViTVLForConditionalGeneration", "FineViTImageProcessor", "FineViTVLProcessor"]
