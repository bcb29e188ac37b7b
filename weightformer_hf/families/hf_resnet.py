"""transformers `ResNetForImageClassification` (basic and bottleneck layers)."""

from __future__ import annotations

import re

from torch import nn
from transformers import ResNetConfig, ResNetForImageClassification

from .base import PermutationSpec
from .resnet_common import resnet_permutation_spec
from .transformers_common import TransformersFamily


def _stage_block(name: str) -> tuple[int, int] | None:
    match = re.search(r"stages\.(\d+)\.layers\.(\d+)\.", name + ".")
    return (int(match.group(1)), int(match.group(2))) if match else None


class HFResNetFamily(TransformersFamily):
    name = "hf_resnet"
    description = "transformers ResNetForImageClassification"
    model_class = ResNetForImageClassification
    config_class = ResNetConfig

    def permutation_spec(self, model: nn.Module) -> PermutationSpec:
        layers = self.layers(model)[0]
        last_index = 2 if model.config.layer_type == "bottleneck" else 1
        return resnet_permutation_spec(
            model,
            layers,
            stage_block=_stage_block,
            is_shortcut=lambda name: ".shortcut." in name + ".",
            is_block_output=lambda name: name.endswith(f".layer.{last_index}.convolution"),
        )
