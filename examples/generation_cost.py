"""Generator size and student-generation time for every family, at the default generator config.

    python examples/generation_cost.py [--k 4] [--families mlp timm_resnet ...]

Teachers have random weights (the cost does not depend on them). "first" includes weight matching of
the K − 1 teachers to the anchor (cached afterwards), "cached" is a second generation of the same set.
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import ResNetConfig, ResNetForImageClassification, ViTConfig, ViTForImageClassification

import weightformer_hf as wf
from weightformer_hf.reference_models import (
    Conv1dClassifier,
    Conv1dClassifierConfig,
    MLPClassifier,
    MLPClassifierConfig,
)

LABELS = {"id2label": {i: str(i) for i in range(10)}, "label2id": {str(i): i for i in range(10)}}


def make(family: str) -> torch.nn.Module:
    if family == "mlp":
        return MLPClassifier(MLPClassifierConfig(hidden_sizes=(256, 256), **LABELS))
    if family == "cnn1d":
        return Conv1dClassifier(Conv1dClassifierConfig(channels=(32, 32, 32), **LABELS))
    if family == "hf_resnet":
        return ResNetForImageClassification(ResNetConfig(num_channels=3, **LABELS))  # ResNet-50 layout
    if family == "hf_vit":
        return ViTForImageClassification(
            ViTConfig(image_size=32, patch_size=4, hidden_size=192, num_hidden_layers=12, num_attention_heads=3,
                      intermediate_size=768, **LABELS)
        )  # fmt: skip
    import timm

    name, kwargs = {
        "timm_resnet": ("resnet18", {}),
        "timm_vgg": ("vgg11_bn", {}),
        "timm_vit": ("vit_tiny_patch16_224", {"img_size": 32, "patch_size": 4}),
    }[family]
    return timm.create_model(name, num_classes=10, **kwargs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--families", nargs="+", default=list(wf.FAMILIES))
    args = parser.parse_args()
    print(f"torch threads: {torch.get_num_threads()}, K = {args.k}")
    print("| family | student params | generator params | first generation (s) | cached (s) |")
    print("|---|---|---|---|---|")
    for family in args.families:
        torch.manual_seed(0)
        models = [make(family).eval() for _ in range(args.k)]
        teachers = wf.TeacherSet.from_models(models)
        generator = wf.WeightFormerModel.for_teachers(teachers)
        times = []
        for _ in range(2):
            start = time.perf_counter()
            generator.generate_student(teachers, anchor=0)
            times.append(time.perf_counter() - start)
        student_params = sum(p.numel() for p in models[0].parameters())
        generator_params = sum(p.numel() for p in generator.parameters())
        print(f"| {family} | {student_params / 1e6:.2f} M | {generator_params / 1e6:.2f} M | "
              f"{times[0]:.2f} | {times[1]:.2f} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
