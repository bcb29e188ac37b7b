"""Registry of supported student architecture families; adding a family means adding one module."""

from __future__ import annotations

from torch import nn

from ..errors import UnsupportedArchitectureError
from .base import Family, LayerSpec, PermutationSpec, TensorSpec
from .hf_resnet import HFResNetFamily
from .hf_vit import HFViTFamily
from .reference import CNN1dFamily, MLPFamily
from .timm_resnet import TimmResNetFamily
from .timm_vgg import TimmVGGFamily
from .timm_vit import TimmViTFamily

FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        MLPFamily(),
        CNN1dFamily(),
        TimmResNetFamily(),
        TimmVGGFamily(),
        TimmViTFamily(),
        HFResNetFamily(),
        HFViTFamily(),
    )
}


def supported_families() -> str:
    return ", ".join(f"{name} ({f.description})" for name, f in FAMILIES.items())


def get_family(name: str) -> Family:
    if name not in FAMILIES:
        raise UnsupportedArchitectureError(
            f"unknown family {name!r}; supported families: {', '.join(FAMILIES)}"
        )
    return FAMILIES[name]


def family_of(model: nn.Module) -> Family:
    """The family a model belongs to, or an error naming its class and listing the supported families."""
    for family in FAMILIES.values():
        if family.matches(model):
            return family
    raise UnsupportedArchitectureError(
        f"unsupported architecture {type(model).__module__}.{type(model).__name__}; "
        f"supported families: {supported_families()}"
    )


__all__ = [
    "FAMILIES",
    "Family",
    "LayerSpec",
    "PermutationSpec",
    "TensorSpec",
    "family_of",
    "get_family",
    "supported_families",
]
