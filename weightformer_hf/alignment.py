"""Data-free weight matching (Git Re-Basin, Ainsworth et al. 2023) of a teacher to the anchor.

Independently trained teachers compute the same function under many channel orders. Given a family's
permutation spec, `weight_matching` finds for every channel-order group the permutation that best lines
up another teacher's weights with the anchor's (coordinate ascent, one linear assignment per group), and
`permute_tensor` applies it to one tensor at a time, so aligned teachers are never held in memory whole.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from .families import PermutationSpec


def _view(tensor: torch.Tensor, reshape: tuple[int, ...] | None) -> torch.Tensor:
    return tensor.reshape(reshape) if reshape is not None else tensor


def permute_tensor(
    name: str,
    tensor: torch.Tensor,
    spec: PermutationSpec,
    perms: Mapping[str, torch.Tensor],
    skip_group: str | None = None,
) -> torch.Tensor:
    """`tensor` with every axis that belongs to a permuted group reordered (except `skip_group`'s)."""
    if name not in spec or not perms:
        return tensor
    groups, reshape = spec[name]
    out = _view(tensor, reshape)
    for axis, group in enumerate(groups):
        if group is not None and group != skip_group and group in perms:
            out = out.index_select(axis, perms[group].to(out.device))
    return out.reshape(tensor.shape)


def weight_matching(
    spec: PermutationSpec,
    anchor: Mapping[str, torch.Tensor],
    other: Mapping[str, torch.Tensor],
    max_iter: int = 30,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Permutations (group → index tensor) such that `other` permuted by them matches `anchor` best.

    `perm[g][i]` is the channel of `other` that plays the role of the anchor's channel `i`.
    """
    axes_of: dict[str, list[tuple[str, int]]] = {}
    sizes: dict[str, int] = {}
    for name, (groups, reshape) in spec.items():
        shape = reshape if reshape is not None else tuple(anchor[name].shape)
        for axis, group in enumerate(groups):
            if group is not None:
                axes_of.setdefault(group, []).append((name, axis))
                sizes[group] = shape[axis]
    if not axes_of:
        return {}
    # linear_sum_assignment runs on the CPU: teachers may live on an accelerator
    a_views = {n: _view(anchor[n].detach().float().cpu(), spec[n][1]) for n in spec}
    o_views = {n: _view(other[n].detach().float().cpu(), spec[n][1]) for n in spec}
    perms = {g: torch.arange(n) for g, n in sizes.items()}
    rng = np.random.default_rng(seed)
    names = sorted(axes_of)
    for _ in range(max_iter):
        improved = False
        for gi in rng.permutation(len(names)):
            group = names[gi]
            n = sizes[group]
            cost = torch.zeros(n, n)
            for name, axis in axes_of[group]:
                w_other = o_views[name]
                groups = spec[name][0]
                for other_axis, other_group in enumerate(groups):
                    if other_axis != axis and other_group is not None:
                        w_other = w_other.index_select(other_axis, perms[other_group])
                wa = a_views[name].movedim(axis, 0).reshape(n, -1)
                wo = w_other.movedim(axis, 0).reshape(n, -1)
                cost += wa @ wo.T
            _, cols = linear_sum_assignment(cost.numpy(), maximize=True)
            new = torch.as_tensor(cols, dtype=torch.long)
            rows = torch.arange(n)
            if cost[rows, new].sum() > cost[rows, perms[group]].sum() + 1e-9 * cost.abs().sum():
                improved = True
            perms[group] = new
        if not improved:
            break
    return perms
