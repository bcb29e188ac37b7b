"""Train many models of one architecture with one recipe (AdamW + one-cycle), each with its own data order
and learning rate: what teacher pools, `kd_converged` and `single_long` are built with.

Models without BatchNorm train all at once under `torch.func.vmap`: on a 2-core CPU one vectorised run of N
MLPs is several times faster than N sequential runs, because every step is one batched matmul instead of N
tiny ones (measured: 11 s per 40-256-256-10 MLP at 6k steps, batch 128, one thread, 64 at once). BatchNorm
updates its running statistics in place, which vmap cannot do, so such models train in a plain loop with the
same recipe.

The optimizer is a vectorised AdamW written out (`_adamw_step`) rather than `torch.optim.AdamW`, because the
stacked parameters of N models are one tensor per name and `torch.optim` has one learning rate per tensor;
pools of fine-tunes need one learning rate per model.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, stack_module_state
from tqdm.auto import tqdm

from .evaluation import logits_of

# loss_fn(logits (n, B, C), labels (n, B), index (n, B), rows (n,)) -> the summed loss of the n models, where
# `rows` are the models' positions in the `models` argument (e.g. to pick each model's own KD targets)
LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def one_cycle(step: int, total: int, warmup_frac: float = 0.3) -> float:
    """Learning-rate multiplier of a one-cycle (linear warm-up, cosine decay) schedule."""
    warmup = max(1, int(total * warmup_frac))
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def _per_model(value: float | Sequence[float], n: int) -> torch.Tensor:
    values = [float(value)] * n if isinstance(value, (int, float)) else [float(v) for v in value]
    if len(values) != n:
        raise ValueError(f"{len(values)} learning rates for {n} models")
    return torch.tensor(values)


@torch.no_grad()
def _adamw_step(params, grads, state, step: int, lr: torch.Tensor, weight_decay: float, betas=(0.9, 0.999), eps=1e-8):
    """One AdamW step (torch.optim.AdamW's update) on stacked tensors `(n, ...)` with a learning rate per model."""
    b1, b2 = betas
    c1, c2 = 1 - b1**step, 1 - b2**step
    for name, p in params.items():
        g = grads[name]
        if name not in state:
            state[name] = (torch.zeros_like(p), torch.zeros_like(p))
        m, v = state[name]
        rate = (lr.view(-1, *([1] * (p.dim() - 1))) if lr.dim() else lr).to(p)
        p.mul_(1 - rate * weight_decay)
        m.mul_(b1).add_(g, alpha=1 - b1)
        v.mul_(b2).addcmul_(g, g, value=1 - b2)
        # p -= rate * (m / c1) / (sqrt(v / c2) + eps), the same operations in place on two temporaries
        # instead of five (the stacked moments of a whole pool chunk: this step was 44 % of a training step)
        update, denominator = (m / c1).mul_(rate), (v / c2).sqrt_().add_(eps)
        p.sub_(update.div_(denominator))


def train_models(
    models: Sequence[nn.Module],
    inputs: torch.Tensor,
    labels: torch.Tensor,
    steps: int,
    batch_size: int = 128,
    lr: float | Sequence[float] = 2e-3,
    weight_decay: float = 1e-4,
    data_seeds: Sequence[int] | None = None,
    loss_fn: LossFn | None = None,
    progress: tqdm | bool = False,
    desc: str = "training",
    batched: bool | None = None,
) -> list[nn.Module]:
    """Train `models` (same architecture, own initial weights) for `steps` AdamW + one-cycle steps.

    Each model draws random minibatches from its own generator (`data_seeds`) and has its own peak `lr` (one
    value or one per model). `loss_fn` (see `LossFn`) defaults to cross-entropy. `batched=None` vectorises
    unless there is a single model or the models have BatchNorm. `progress`: a tqdm bar to advance by one
    per step, or True for a bar of our own. Returns the same model objects, trained, in eval mode.
    """
    data_seeds = list(data_seeds) if data_seeds is not None else list(range(len(models)))
    rates = _per_model(lr, len(models))
    if batched is None:
        batched = len(models) > 1 and not any(has_batchnorm(m) for m in models)
    rows = torch.arange(len(models))
    groups = [rows] if batched else [rows[i : i + 1] for i in range(len(models))]
    total = steps * len(groups)
    bar = progress if isinstance(progress, tqdm) else tqdm(total=total, desc=desc, disable=not progress)
    for group in groups:
        _train_group([models[i] for i in group], group, inputs, labels, steps, batch_size, rates[group],
                     weight_decay, [data_seeds[i] for i in group], loss_fn, bar)  # fmt: skip
    if bar is not progress:
        bar.close()
    return list(models)


def _train_group(models, rows, inputs, labels, steps, batch_size, rates, weight_decay, seeds, loss_fn, bar):
    n = len(models)
    template = models[0]
    if n == 1:  # a plain module call: BatchNorm updates its statistics, no vmap needed
        params = dict(template.named_parameters())

        def forward(x):
            return logits_of(template(x[0]))[None]

    else:
        stacked, buffers = stack_module_state(list(models))
        params = {k: v.detach().clone().requires_grad_(True) for k, v in stacked.items()}

        def one(p, b, x):
            return logits_of(functional_call(template, (p, b), (x,)))

        batched_logits = torch.vmap(one, in_dims=(0, 0, 0))

        def forward(x):
            return batched_logits(params, buffers, x)

    generators = [torch.Generator().manual_seed(s) for s in seeds]
    state: dict = {}
    template.train()
    for step in range(steps):
        index = torch.stack([torch.randint(len(inputs), (batch_size,), generator=g) for g in generators])
        logits = forward(inputs[index])  # (n, B, C)
        if loss_fn is None:
            loss = F.cross_entropy(logits.flatten(0, 1), labels[index].flatten(), reduction="sum") / batch_size
        else:
            loss = loss_fn(logits, labels[index], index, rows)
        grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params.values(), grads)]
        rate = rates * one_cycle(step, steps)
        _adamw_step(params, dict(zip(params, grads)), state, step + 1, rate if n > 1 else rate[0], weight_decay)
        bar.update(1)
    if n > 1:
        with torch.no_grad():
            for i, model in enumerate(models):
                model.load_state_dict({k: v[i].detach().clone() for k, v in params.items()}, strict=False)
    for model in models:
        model.eval()
