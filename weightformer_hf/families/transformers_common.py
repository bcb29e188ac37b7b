"""Shared behaviour of families whose models are transformers `PreTrainedModel`s."""

from __future__ import annotations

import torch
from torch import nn

from .base import Family

# Config keys that describe labels, dtype or provenance rather than the architecture.
_NON_ARCH_KEYS = {
    "id2label",
    "label2id",
    "num_labels",
    "dtype",
    "torch_dtype",
    "transformers_version",
    "_name_or_path",
    "architectures",
    "problem_type",
    "_commit_hash",
    "output_attentions",
    "output_hidden_states",
    "return_dict",
    "auto_map",
}


class TransformersFamily(Family):
    """A family backed by one transformers model class (`model_class`, `config_class`)."""

    format = "transformers"
    model_class: type = nn.Module
    config_class: type = object

    def matches(self, model: nn.Module) -> bool:
        return type(model) is self.model_class

    def describe(self, model: nn.Module) -> dict:
        config = model.config.to_dict()
        return {
            "class": self.model_class.__name__,
            "config": {k: v for k, v in sorted(config.items()) if k not in _NON_ARCH_KEYS},
        }

    def build(self, arch: dict, label_names: list[str]) -> nn.Module:
        config_kwargs = {k: v for k, v in arch["config"].items() if k != "model_type"}
        config = self.config_class(
            **config_kwargs,
            id2label=dict(enumerate(label_names)),
            label2id={name: i for i, name in enumerate(label_names)},
        )
        model = self.model_class(config)
        return model.eval()

    def label_names(self, model: nn.Module) -> list[str]:
        id2label = model.config.id2label
        return [str(id2label[i]) for i in range(len(id2label))]

    def logits(self, model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
        return model(inputs).logits
