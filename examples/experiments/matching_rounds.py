"""Quality next to speed of weight matching's stopping rule, on a planted permutation under noise.

    OMP_NUM_THREADS=2 python examples/experiments/matching_rounds.py --arch vgg11_bn --sigmas 1 2 3

One random timm model is the anchor; the other teacher is the anchor with every channel-order group
permuted at random and every tensor noised (`sigma` × the tensor's std: "trained-like" at small sigma, close
to independent teachers at large). Each setting (at most N rounds, stopping tolerance) reports its rounds,
seconds and the fraction of channels mapped back to their planted place. One JSON line per setting.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch import nn

from weightformer_hf import TeacherSet
from weightformer_hf.alignment import _spec_groups, permute_tensor, weight_matching

SETTINGS = [(1, 1e-3), (2, 1e-3), (30, 1e-2), (30, 1e-3)]  # (max rounds, tol); the last is the default


def recovery(model: nn.Module, sigmas: list[float], settings=SETTINGS, seed: int = 3) -> list[dict]:
    """Rows of (sigma, max_iter, tol, rounds, seconds, recovered) for a planted permutation of `model`."""
    teachers = TeacherSet.from_models([model])
    spec = teachers.family.permutation_spec(teachers.template)
    anchor = {k: v.detach().clone() for k, v in model.state_dict().items()}
    sizes, _ = _spec_groups(spec, anchor)
    gen = torch.Generator().manual_seed(seed)
    planted = {g: torch.randperm(n, generator=gen) for g, n in sorted(sizes.items())}
    rows = []
    for sigma in sigmas:
        other = {}
        for name, tensor in anchor.items():
            tensor = permute_tensor(name, tensor, spec, planted)
            if sigma and tensor.is_floating_point() and tensor.numel() > 1:
                tensor = tensor + sigma * tensor.std() * torch.randn(tensor.shape, generator=gen)
            other[name] = tensor
        for max_iter, tol in settings:
            stats: dict = {}
            start = time.perf_counter()
            found = weight_matching(spec, anchor, other, max_iter=max_iter, tol=tol, stats=stats)
            seconds = time.perf_counter() - start
            right = sum(int((found[g] == torch.argsort(p)).sum()) for g, p in planted.items())
            rows.append({
                "sigma": sigma, "max_iter": max_iter, "tol": tol, "rounds": stats["rounds"],
                "seconds": round(seconds, 2), "recovered": right / sum(sizes.values()),
            })  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", default="vgg11_bn")
    parser.add_argument("--sigmas", type=float, nargs="+", default=[1.0, 2.0, 3.0])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    import timm

    torch.manual_seed(args.seed)
    model = timm.create_model(args.arch, pretrained=False, num_classes=1000)
    for row in recovery(model, args.sigmas):
        print(json.dumps({"arch": args.arch, **row}), flush=True)


if __name__ == "__main__":
    main()
