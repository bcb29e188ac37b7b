"""transformers `ViTForImageClassification` (separate q/k/v projections)."""

from __future__ import annotations

from torch import nn
from transformers import ViTConfig, ViTForImageClassification

from .base import PermutationSpec
from .transformers_common import TransformersFamily
from .vit_common import vit_permutation_spec


class HFViTFamily(TransformersFamily):
    name = "hf_vit"
    description = "transformers ViTForImageClassification"
    model_class = ViTForImageClassification
    config_class = ViTConfig

    def permutation_spec(self, model: nn.Module) -> PermutationSpec:
        return vit_permutation_spec(
            model,
            self.layers(model)[0],
            mlp_in=".mlp.fc1",
            mlp_out=".mlp.fc2",
            attn_in=(".q_proj", ".k_proj", ".v_proj"),
            attn_out=".o_proj",
            classifier="classifier",
        )
