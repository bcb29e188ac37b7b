"""Train many small models of one architecture at once (`torch.func.vmap`), each with its own data order.

Benchmark pools need tens of converged teachers; on a 2-core CPU, one vectorised run of N MLPs is several
times faster than N sequential runs because every step is one batched matmul instead of N tiny ones.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, stack_module_state
from tqdm.auto import tqdm


def one_cycle(step: int, total: int, warmup_frac: float = 0.3) -> float:
    """Learning-rate multiplier of a one-cycle (linear warm-up, cosine decay) schedule."""
    warmup = max(1, int(total * warmup_frac))
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def train_models_batched(
    models: Sequence[nn.Module],
    inputs: torch.Tensor,
    labels: torch.Tensor,
    steps: int,
    batch_size: int = 128,
    lr: float = 2e-3,
    weight_decay: float = 1e-4,
    data_seeds: Sequence[int] | None = None,
    loss_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    progress: bool = True,
    desc: str = "training",
) -> list[nn.Module]:
    """Train `models` (same architecture, own initial weights) with AdamW + one-cycle, in parallel.

    Each model draws its minibatches from its own generator (`data_seeds`), so models differ by
    initialisation and data order. `loss_fn(logits, labels, batch_index)` defaults to cross-entropy.
    Returns the same model objects, trained, in eval mode.
    """
    n = len(models)
    data_seeds = list(data_seeds) if data_seeds is not None else list(range(n))
    params, buffers = stack_module_state(list(models))
    params = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    template = models[0]

    def logits_fn(p, b, x):
        out = functional_call(template, (p, b), (x,))
        return out if isinstance(out, torch.Tensor) else out.logits

    batched_logits = torch.vmap(logits_fn, in_dims=(0, 0, 0))
    optimizer = torch.optim.AdamW(params.values(), lr=lr, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: one_cycle(s, steps))
    generators = [torch.Generator().manual_seed(s) for s in data_seeds]
    template.train()
    for _ in tqdm(range(steps), desc=desc, disable=not progress):
        index = torch.stack([torch.randint(len(inputs), (batch_size,), generator=g) for g in generators])
        logits = batched_logits(params, buffers, inputs[index])  # (n, B, C)
        if loss_fn is None:
            loss = (
                F.cross_entropy(logits.flatten(0, 1), labels[index].flatten(), reduction="sum") / batch_size
            )
        else:
            loss = loss_fn(logits, labels[index], index)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
    with torch.no_grad():
        for i, model in enumerate(models):
            model.load_state_dict({k: v[i].detach().clone() for k, v in params.items()}, strict=False)
            model.eval()
    return list(models)
