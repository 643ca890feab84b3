"""optvq-hf: the OptVQ image tokenizer (vector quantization by optimal transport) for Hugging Face transformers."""

from transformers import AutoConfig, AutoImageProcessor, AutoModel

from .configuration_optvq import OptVQConfig
from .image_processing_optvq import OptVQImageProcessor
from .modeling_optvq import (
    OptVQDecoderOutput,
    OptVQEncoderOutput,
    OptVQModel,
    OptVQModelOutput,
    OptVQPreTrainedModel,
)
from .quantization import QuantizerOutput, SinkhornQuantizer, VectorQuantizer, sinkhorn
from .tokens import TokenLayout, indices_to_tokens, tokens_to_indices

__version__ = "0.1.0"


def _register_auto_classes() -> None:
    AutoConfig.register("optvq", OptVQConfig, exist_ok=True)
    AutoModel.register(OptVQConfig, OptVQModel, exist_ok=True)
    AutoImageProcessor.register(OptVQConfig, image_processor_classes={"pil": OptVQImageProcessor}, exist_ok=True)
    # Saved folders carry the code and an auto_map, so that they load with trust_remote_code=True without this package.
    OptVQConfig.register_for_auto_class()
    OptVQModel.register_for_auto_class("AutoModel")
    OptVQImageProcessor.register_for_auto_class("AutoImageProcessor")


_register_auto_classes()

__all__ = [
    "OptVQConfig",
    "OptVQDecoderOutput",
    "OptVQEncoderOutput",
    "OptVQImageProcessor",
    "OptVQModel",
    "OptVQModelOutput",
    "OptVQPreTrainedModel",
    "QuantizerOutput",
    "SinkhornQuantizer",
    "TokenLayout",
    "VectorQuantizer",
    "indices_to_tokens",
    "sinkhorn",
    "tokens_to_indices",
]
