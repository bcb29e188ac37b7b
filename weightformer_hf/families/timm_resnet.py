"""timm `ResNet` (resnet10t, resnet18, resnet50, ...), including deep stems and avg-down shortcuts.

Channel-order groups: each stage's residual stream is one group shared by the stage's block outputs
(conv2 in basic blocks, conv3 in bottlenecks), its downsample conv and the next stage's inputs; the stem's
output is the stream group of the first stage when that stage has no downsample; inner block convs each
have their own group.
"""

from __future__ import annotations

import re

from torch import nn

from .base import PermutationSpec
from .resnet_common import resnet_permutation_spec
from .timm_common import TimmFamily


def _stage_block(name: str) -> tuple[int, int] | None:
    match = re.match(r"layer(\d+)\.(\d+)\.", name + ".")
    return (int(match.group(1)), int(match.group(2))) if match else None


class TimmResNetFamily(TimmFamily):
    name = "timm_resnet"
    description = "timm ResNet (resnet10t, resnet18, resnet50, ...)"
    model_class_path = "timm.models.resnet.ResNet"

    def permutation_spec(self, model: nn.Module) -> PermutationSpec:
        layers = self.layers(model)[0]
        return resnet_permutation_spec(
            model,
            layers,
            stage_block=_stage_block,
            is_shortcut=lambda name: ".downsample." in name + ".",
            is_block_output=lambda name: (
                name.endswith(".conv3") or (name.endswith(".conv2") and not _has_conv3(model, name))
            ),
        )


def _has_conv3(model: nn.Module, conv2_name: str) -> bool:
    return hasattr(model.get_submodule(conv2_name.rsplit(".", 1)[0]), "conv3")
