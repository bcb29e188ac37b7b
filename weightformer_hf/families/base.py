"""What a student architecture family is: its layers, its channel axes and its channel-order groups.

A family turns a model into an ordered list of `LayerSpec`s (forward order). Each layer has `channels`
output channels; every tensor of the layer has one axis of that size (`channel_axis`), and one generator
token is one channel of one teacher: the slice of every tensor of the layer at that channel, flattened.

A family may also give a permutation spec (Git Re-Basin style): for each tensor, which channel-order
group permutes each axis. Tensors whose axes share a group must be permuted together to keep the network's
function, e.g. every tensor that reads or writes a residual stream. It drives weight-matching alignment of
teachers to the anchor (`weightformer_hf.alignment`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

# tensor name -> (group per axis of the (optionally reshaped) tensor, reshape or None)
PermutationSpec = dict[str, tuple[tuple[str | None, ...], tuple[int, ...] | None]]


@dataclass
class TensorSpec:
    """One tensor of a layer, with the axis that indexes the layer's output channels."""

    name: str
    channel_axis: int = 0
    positive: bool = False  # strictly positive (BatchNorm running_var): updated multiplicatively


@dataclass
class LayerSpec:
    """A generator layer: tensors that share one output-channel axis of size `channels`."""

    name: str
    channels: int
    tensors: list[TensorSpec] = field(default_factory=list)

    def token_width(self, shapes: dict[str, torch.Size]) -> int:
        """Length of one channel's token (all tensors' slices at one channel, flattened)."""
        return sum(shapes[t.name].numel() // self.channels for t in self.tensors)


_CONV_LINEAR = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BATCH_NORMS = (nn.modules.batchnorm._BatchNorm,)


def walk_layers(model: nn.Module) -> tuple[list[LayerSpec], list[str]]:
    """Split a model's floating-point state into layers, in module registration (≈ forward) order.

    A conv or linear layer owns its weight and bias, and the BatchNorm that directly follows it with the
    same number of features (its statistics and affine parameters describe the same channels). Any other
    module with its own tensors (LayerNorm, class tokens, position embeddings) forms its own layer, with
    the last axis as channel axis for tensors of rank > 1 (the embedding dimension) and axis 0 otherwise.

    Returns the layers and the names of non-floating state (e.g. `num_batches_tracked`), which carries no
    learned information and is taken from the anchor.
    """
    state_names = set(model.state_dict().keys())
    layers: list[LayerSpec] = []
    non_float: list[str] = []
    open_conv: LayerSpec | None = None  # the last conv/linear layer a BatchNorm may still attach to
    for mod_name, module in model.named_modules():
        prefix = f"{mod_name}." if mod_name else ""
        own = [
            (prefix + n, t)
            for n, t in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]
            if prefix + n in state_names
        ]
        floats = [(n, t) for n, t in own if t.is_floating_point()]
        non_float += [n for n, t in own if not t.is_floating_point()]
        if not floats:
            continue
        if isinstance(module, _CONV_LINEAR):
            spec = LayerSpec(mod_name, floats[0][1].shape[0], [TensorSpec(n) for n, _ in floats])
            layers.append(spec)
            open_conv = spec
            continue
        if (
            isinstance(module, _BATCH_NORMS)
            and open_conv is not None
            and open_conv.channels == module.num_features
        ):
            open_conv.tensors += [TensorSpec(n, 0, positive=n.endswith("running_var")) for n, _ in floats]
            open_conv = None
            continue
        open_conv = None
        by_channels: dict[int, LayerSpec] = {}
        for n, t in floats:
            axis = 0 if t.ndim == 1 else t.ndim - 1
            channels = t.shape[axis]
            if channels not in by_channels:
                by_channels[channels] = LayerSpec(mod_name or n, channels)
                layers.append(by_channels[channels])
            by_channels[channels].tensors.append(TensorSpec(n, axis, positive=n.endswith("running_var")))
    return layers, non_float


def chain_permutation_spec(
    model: nn.Module, layers: list[LayerSpec], flatten_lengths: dict[str, int] | None = None
) -> PermutationSpec:
    """Permutation spec of a plain chain (MLP, plain CNN, VGG): each layer's output permutes the next input.

    The last layer is the classifier, whose outputs (classes) are never permuted. `flatten_lengths` maps
    a layer name to the spatial length that a Flatten folded into its input axis.
    """
    flatten_lengths = flatten_lengths or {}
    spec: PermutationSpec = {}
    state = model.state_dict()
    previous: str | None = None
    for i, layer in enumerate(layers):
        group = None if i == len(layers) - 1 else f"P_{layer.name}"
        for t in layer.tensors:
            shape = tuple(state[t.name].shape)
            if len(shape) == 1:
                spec[t.name] = ((group,), None)
            elif layer.name in flatten_lengths:
                length = flatten_lengths[layer.name]
                spec[t.name] = ((group, previous, None), (shape[0], shape[1] // length, length))
            else:
                spec[t.name] = ((group, previous, *([None] * (len(shape) - 2))), None)
        previous = group
    return spec


class Family:
    """Everything weightformer_hf knows about one architecture family.

    Subclasses set `name`, `format` ("timm" or "transformers") and `description`, and implement
    `matches`, `describe`, `build`, `label_names` and `logits`. `layers` and `permutation_spec` have
    generic defaults.
    """

    name: str = ""
    format: str = ""
    description: str = ""

    def matches(self, model: nn.Module) -> bool:
        raise NotImplementedError

    def describe(self, model: nn.Module) -> dict:
        """A JSON-able description from which `build` recreates the architecture (without labels)."""
        raise NotImplementedError

    def build(self, arch: dict, label_names: list[str]) -> nn.Module:
        """A randomly initialised model of the described architecture with these labels, in eval mode."""
        raise NotImplementedError

    def label_names(self, model: nn.Module) -> list[str]:
        raise NotImplementedError

    def logits(self, model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
        out = model(inputs)
        return out if isinstance(out, torch.Tensor) else out.logits

    def layers(self, model: nn.Module) -> tuple[list[LayerSpec], list[str]]:
        return walk_layers(model)

    def permutation_spec(self, model: nn.Module) -> PermutationSpec:
        """Channel-order groups; an empty spec means teachers are not aligned before generation."""
        return {}
