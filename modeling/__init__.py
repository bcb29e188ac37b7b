"""The WeightFormer config/model pair (installed as `weightformer_hf.modeling`)."""

from .configuration_weightformer import WeightFormerConfig
from .modeling_weightformer import (
    WeightFormerModel,
    WeightFormerOutput,
    WeightFormerPreTrainedModel,
    run_student,
)

__all__ = [
    "WeightFormerConfig",
    "WeightFormerModel",
    "WeightFormerOutput",
    "WeightFormerPreTrainedModel",
    "run_student",
]
