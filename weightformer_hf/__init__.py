"""weightformer_hf: WeightFormer (Meta-Ensemble Parameter Learning) for the Hugging Face ecosystem.

Importing the package registers `WeightFormerConfig`/`WeightFormerModel` with `AutoConfig`/`AutoModel`
(and the MNIST-1D reference classifiers), so `AutoModel.from_pretrained` loads saved generators.
"""

from transformers import AutoConfig, AutoModel

from . import reference_models  # noqa: F401  (registers the reference classifiers)
from .errors import (
    InvalidWeightsError,
    TeacherMismatchError,
    TeacherSourceError,
    UnsupportedArchitectureError,
    WeightFormerError,
)
from .families import FAMILIES, family_of, supported_families
from .modeling import WeightFormerConfig, WeightFormerModel, WeightFormerOutput, run_student
from .teachers import TeacherInfo, TeacherSet

__version__ = "0.1.0"

try:
    AutoConfig.register("weightformer", WeightFormerConfig)
    AutoModel.register(WeightFormerConfig, WeightFormerModel)
except ValueError:  # already registered
    pass

__all__ = [
    "FAMILIES",
    "InvalidWeightsError",
    "TeacherInfo",
    "TeacherMismatchError",
    "TeacherSet",
    "TeacherSourceError",
    "UnsupportedArchitectureError",
    "WeightFormerConfig",
    "WeightFormerError",
    "WeightFormerModel",
    "WeightFormerOutput",
    "family_of",
    "run_student",
    "supported_families",
]
