"""Channel-order groups of Vision Transformers, shared by the timm and transformers ViT families.

The embedding dimension is one residual stream read and written by every block, so it is a single group
for the patch embedding, class token, position embedding, every LayerNorm and every block's output
projections. Each block's MLP hidden layer is its own group. Attention heads are left unpermuted (a valid,
smaller symmetry group), so q/k/v outputs and the attention output's input are not aligned.
"""

from __future__ import annotations

import re

from torch import nn

from .base import LayerSpec, PermutationSpec

STREAM = "R_embed"


def vit_permutation_spec(
    model: nn.Module,
    layers: list[LayerSpec],
    mlp_in: str,
    mlp_out: str,
    attn_in: tuple[str, ...],
    attn_out: str,
    classifier: str,
) -> PermutationSpec:
    """Spec from name suffixes of the MLP, attention and classifier linears; the rest is the stream."""
    state = model.state_dict()
    spec: PermutationSpec = {}
    for layer in layers:
        block = re.search(r"\.(\d+)\.", layer.name)
        hidden = f"H_{block.group(1)}" if block else None
        if layer.name.endswith(mlp_in):
            out_g, in_g = hidden, STREAM
        elif layer.name.endswith(mlp_out):
            out_g, in_g = STREAM, hidden
        elif layer.name.endswith(attn_in):
            out_g, in_g = None, STREAM
        elif layer.name.endswith(attn_out):
            out_g, in_g = STREAM, None
        elif layer.name == classifier:
            out_g, in_g = None, STREAM
        else:
            out_g, in_g = STREAM, None
        for t in layer.tensors:
            shape = state[t.name].shape
            groups: list[str | None] = [None] * len(shape)
            groups[t.channel_axis] = out_g
            if t.channel_axis == 0 and len(shape) >= 2:
                groups[1] = in_g
            spec[t.name] = (tuple(groups), None)
    return spec
