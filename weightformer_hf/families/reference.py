"""The MNIST-1D reference families: `mlp` (MLPClassifier) and `cnn1d` (Conv1dClassifier).

Both are plain chains, so every hidden layer's output channels form one channel-order group that the next
layer reads; the classifier's outputs (the classes) are never permuted.
"""

from __future__ import annotations

from torch import nn

from ..reference_models import (
    Conv1dClassifier,
    Conv1dClassifierConfig,
    MLPClassifier,
    MLPClassifierConfig,
)
from .base import Family, PermutationSpec, chain_permutation_spec
from .transformers_common import TransformersFamily


class MLPFamily(TransformersFamily):
    name = "mlp"
    description = "weightformer_hf.MLPClassifier (model_type wf_mlp): the MNIST-1D reference MLP"
    model_class = MLPClassifier
    config_class = MLPClassifierConfig

    def permutation_spec(self, model: nn.Module) -> PermutationSpec:
        return chain_permutation_spec(model, self.layers(model)[0])


class CNN1dFamily(TransformersFamily):
    name = "cnn1d"
    description = "weightformer_hf.Conv1dClassifier (model_type wf_cnn1d): the MNIST-1D reference 1-D CNN"
    model_class = Conv1dClassifier
    config_class = Conv1dClassifierConfig

    def permutation_spec(self, model: nn.Module) -> PermutationSpec:
        layers = self.layers(model)[0]
        head = layers[-1].name
        return chain_permutation_spec(model, layers, flatten_lengths={head: model.config.output_length()})


FAMILIES: list[Family] = [MLPFamily(), CNN1dFamily()]
