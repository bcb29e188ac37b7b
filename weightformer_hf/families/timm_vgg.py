"""timm `VGG` (vgg11, vgg11_bn, ...): a plain chain of convs, the ConvMlp pre-logits and the head."""

from __future__ import annotations

from torch import nn

from .base import PermutationSpec, chain_permutation_spec
from .timm_common import TimmFamily


class TimmVGGFamily(TimmFamily):
    name = "timm_vgg"
    description = "timm VGG (vgg11, vgg11_bn, vgg16, ...)"
    model_class_path = "timm.models.vgg.VGG"

    def infer_model_args(self, model: nn.Module) -> dict:
        # the pre-logits ConvMlp is 4096 * mlp_ratio wide
        return {
            "in_chans": model.features[0].in_channels,
            "mlp_ratio": model.pre_logits.fc1.out_channels / 4096,
        }

    def permutation_spec(self, model: nn.Module) -> PermutationSpec:
        return chain_permutation_spec(model, self.layers(model)[0])
