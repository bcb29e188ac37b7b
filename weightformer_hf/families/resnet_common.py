"""Channel-order groups of ResNets, shared by the timm and transformers ResNet families."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from .base import LayerSpec, PermutationSpec


def resnet_permutation_spec(
    model: nn.Module,
    layers: list[LayerSpec],
    stage_block: Callable[[str], tuple[int, int] | None],
    is_shortcut: Callable[[str], bool],
    is_block_output: Callable[[str], bool],
) -> PermutationSpec:
    """Build a ResNet spec from the layer list (forward order) and three naming predicates.

    Stem layers form a chain whose last output is the first residual stream. A stage gets a new stream
    group when its first block has a shortcut conv; otherwise it keeps the incoming stream.
    """
    state = model.state_dict()
    out_group: dict[str, str | None] = {}
    in_group: dict[str, str | None] = {}
    stream = None
    previous = None
    current_stage = None
    block_input = None
    stage_has_shortcut: dict[int, bool] = {}
    for layer in layers:
        sb = stage_block(layer.name)
        if sb is not None and is_shortcut(layer.name):
            stage_has_shortcut[sb[0]] = True
    for i, layer in enumerate(layers):
        sb = stage_block(layer.name)
        if i == len(layers) - 1:  # classifier
            in_group[layer.name], out_group[layer.name] = stream, None
            continue
        if sb is None:  # stem chain
            in_group[layer.name] = previous
            out_group[layer.name] = previous = f"P_{layer.name}"
            stream = previous
            continue
        stage, block = sb
        if stage != current_stage:
            current_stage = stage
            incoming = stream
            if stage_has_shortcut.get(stage):
                stream = f"R_stage{stage}"
        if (stage, block) != block_input:
            block_input = (stage, block)
            previous = incoming if block == 0 else stream
        if is_shortcut(layer.name):
            in_group[layer.name], out_group[layer.name] = incoming, stream
        elif is_block_output(layer.name):
            in_group[layer.name], out_group[layer.name] = previous, stream
        else:
            in_group[layer.name] = previous
            out_group[layer.name] = previous = f"P_{layer.name}"
    spec: PermutationSpec = {}
    for layer in layers:
        for t in layer.tensors:
            ndim = state[t.name].ndim
            groups = (
                (out_group[layer.name],)
                if ndim == 1
                else (out_group[layer.name], in_group[layer.name], *[None] * (ndim - 2))
            )
            spec[t.name] = (groups, None)
    return spec
