"""timm `VisionTransformer` (vit_tiny ... vit_base_patch32): fused qkv, class token, position embedding."""

from __future__ import annotations

from torch import nn

from .base import PermutationSpec
from .timm_common import TimmFamily
from .vit_common import vit_permutation_spec


class TimmViTFamily(TimmFamily):
    name = "timm_vit"
    description = "timm VisionTransformer (vit_tiny_patch16_224 ... vit_base_patch32_224)"
    model_class_path = "timm.models.vision_transformer.VisionTransformer"

    def infer_model_args(self, model: nn.Module) -> dict:
        embed = model.patch_embed
        block = model.blocks[0]
        return {
            "img_size": int(embed.img_size[0]),
            "patch_size": int(embed.patch_size[0]),
            "in_chans": int(embed.proj.in_channels),
            "embed_dim": int(model.embed_dim),
            "depth": len(model.blocks),
            "num_heads": int(block.attn.num_heads),
            "mlp_ratio": block.mlp.fc1.out_features / model.embed_dim,
            "global_pool": model.global_pool,
        }

    def permutation_spec(self, model: nn.Module) -> PermutationSpec:
        return vit_permutation_spec(
            model,
            self.layers(model)[0],
            mlp_in=".mlp.fc1",
            mlp_out=".mlp.fc2",
            attn_in=(".attn.qkv",),
            attn_out=".attn.proj",
            classifier="head",
        )
