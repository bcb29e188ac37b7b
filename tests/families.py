"""Tiny models of every supported family, for tests (random weights, seconds to build)."""

from __future__ import annotations

import torch
from transformers import ResNetConfig, ResNetForImageClassification, ViTConfig, ViTForImageClassification

from weightformer_hf.reference_models import (
    Conv1dClassifier,
    Conv1dClassifierConfig,
    MLPClassifier,
    MLPClassifierConfig,
)

LABELS = [str(i) for i in range(10)]


def _hf_labels() -> dict:
    return {"id2label": dict(enumerate(LABELS)), "label2id": {n: i for i, n in enumerate(LABELS)}}


def make_model(family: str, seed: int, **overrides) -> torch.nn.Module:
    """A randomly initialised tiny model of `family`; BatchNorm statistics are randomised too."""
    torch.manual_seed(seed)
    if family == "mlp":
        model = MLPClassifier(MLPClassifierConfig(hidden_sizes=overrides.get("hidden_sizes", (16, 16)), **_hf_labels()))
    elif family == "cnn1d":
        model = Conv1dClassifier(Conv1dClassifierConfig(channels=(4, 4), **_hf_labels()))
    elif family == "hf_resnet":
        config = ResNetConfig(num_channels=1, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], **_hf_labels())
        model = ResNetForImageClassification(config)
    elif family == "hf_vit":
        config = ViTConfig(
            image_size=16,
            patch_size=4,
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=32,
            num_channels=1,
            **_hf_labels(),
        )
        model = ViTForImageClassification(config)
    else:
        import timm

        kwargs = {
            "timm_resnet": ("resnet10t", {"in_chans": 1}),
            "timm_vgg": ("vgg11_bn", {"in_chans": 1, "mlp_ratio": 1 / 128}),
            "timm_vit": (
                "vit_tiny_patch16_224",
                {"img_size": 16, "patch_size": 4, "in_chans": 1, "embed_dim": 16, "depth": 2, "num_heads": 2},
            ),
        }[family]
        model = timm.create_model(
            kwargs[0], pretrained=False, num_classes=overrides.get("num_classes", 10), **kwargs[1]
        )
        if family == "timm_vgg" and "head_hidden_size" in overrides:
            # timm fixes VGG's pre-logits width at 4,096; a narrower one keeps the layout (7×7 fc1, 1×1 fc2,
            # linear head) for tests whose pure-Python reference solver would spend minutes on that width.
            width = overrides["head_hidden_size"]
            model.pre_logits.fc2 = torch.nn.Conv2d(model.pre_logits.fc1.out_channels, width, 1)
            model.head.fc = torch.nn.Linear(width, model.head.fc.out_features)
            model.head_hidden_size = width
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.running_mean.normal_(0, 0.1)
                module.running_var.uniform_(0.5, 1.5)
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0, 0.1)
    return model.eval()


def make_inputs(family: str, batch: int = 3) -> torch.Tensor:
    generator = torch.Generator().manual_seed(123)
    if family in ("mlp", "cnn1d"):
        shape = (batch, 40)
    elif family in ("hf_vit", "timm_vit"):
        shape = (batch, 1, 16, 16)
    else:
        shape = (batch, 1, 32, 32)
    return torch.randn(shape, generator=generator)


ALL_FAMILIES = ["mlp", "cnn1d", "timm_resnet", "timm_vgg", "timm_vit", "hf_resnet", "hf_vit"]


# Shared by the generator tests: a small generator config and helpers.
SMALL = {
    "hidden_size": 32,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "num_hidden_layers": 1,
    "align_max_iter": 2,
}


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.is_floating_point() else t


def perturb(model: torch.nn.Module, seed: int = 0, std: float = 0.05) -> None:
    """Move every generator parameter off its initial value (zero decoders included)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * std)
