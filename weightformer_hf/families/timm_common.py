"""Shared behaviour of families whose models are timm models (optional dependency `timm`)."""

from __future__ import annotations

import importlib

from torch import nn

from .base import Family


def import_timm():
    try:
        return importlib.import_module("timm")
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("timm teachers need the `timm` extra: pip install 'weightformer-hf[timm]'") from err


def first_conv_in_channels(model: nn.Module) -> int:
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            return module.in_channels
    return 3


class TimmFamily(Family):
    """A family backed by one timm model class, named by its dotted path in `model_class_path`."""

    format = "timm"
    model_class_path: str = ""

    def _model_class(self) -> type | None:
        module_name, cls_name = self.model_class_path.rsplit(".", 1)
        try:
            return getattr(importlib.import_module(module_name), cls_name)
        except ImportError:
            return None

    def matches(self, model: nn.Module) -> bool:
        cls = self._model_class()
        return cls is not None and type(model) is cls

    def infer_model_args(self, model: nn.Module) -> dict:
        return {"in_chans": first_conv_in_channels(model)}

    def describe(self, model: nn.Module) -> dict:
        model_args = getattr(model, "weightformer_model_args", None)
        if model_args is None:
            model_args = self.infer_model_args(model)
        model_args = {k: v for k, v in model_args.items() if k != "num_classes"}
        return {"architecture": model.pretrained_cfg["architecture"], "model_args": model_args}

    def build(self, arch: dict, label_names: list[str]) -> nn.Module:
        timm = import_timm()
        model = timm.create_model(
            arch["architecture"], pretrained=False, num_classes=len(label_names), **arch["model_args"]
        )
        model.pretrained_cfg = {**model.pretrained_cfg, "label_names": list(label_names)}
        model.weightformer_model_args = dict(arch["model_args"])
        return model.eval()

    def label_names(self, model: nn.Module) -> list[str]:
        names = model.pretrained_cfg.get("label_names")
        if names and len(names) == model.num_classes:
            return [str(n) for n in names]
        return [str(i) for i in range(model.num_classes)]
