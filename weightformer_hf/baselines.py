"""One-model baselines that WeightFormer is compared with in `examples/benchmark.py`.

Every function takes teachers as a `TeacherSet` (or plain models) and returns one model of the teachers'
architecture, in eval mode:

- `weight_average`: the uniform average of the teachers' weights, with no alignment (a "uniform soup").
- `aligned_average`: Git Re-Basin **weight matching** (`alignment.weight_matching`: coordinate ascent,
  one `scipy.optimize.linear_sum_assignment` per channel-order group, on weight correlations, no data)
  of every teacher to the anchor, then the uniform average ("MergeMany" against a fixed anchor).
- `kd_anchor`: the anchor fine-tuned by knowledge distillation on the ensemble (the cheap practical
  alternative): AdamW lr 3e-4, batch 256, T = 4, on fixed data whose teacher logits are given.
- `kd_converged`: students distilled from scratch to convergence, many at once (`train_models_batched`).
- `single_long`: models trained with the teachers' recipe for a longer budget (`train_models_batched`).

Models with BatchNorm cannot be trained under `torch.func.vmap` (the running statistics are updated in
place), so `train_models` falls back to a plain loop with the same recipe for them. Averaged weights change
what each BatchNorm sees: `recompute_bn` re-estimates the statistics on data (the cheap part of REPAIR).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .alignment import permute_tensor, weight_matching
from .batched_training import one_cycle, train_models_batched
from .teachers import TeacherSet


def _as_set(teachers: TeacherSet | Sequence[nn.Module]) -> TeacherSet:
    return teachers if isinstance(teachers, TeacherSet) else TeacherSet.from_models(list(teachers))


def logits_of(output) -> torch.Tensor:
    """Logits from a timm (tensor) or transformers (`.logits`) forward."""
    return output if isinstance(output, torch.Tensor) else output.logits


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def _average(state_dicts: Sequence[dict[str, torch.Tensor]], template: dict[str, torch.Tensor]) -> dict:
    """Uniform average of floating tensors; integer tensors (BN counters) are taken from the first."""
    out = {}
    for name, ref in template.items():
        if ref.is_floating_point():
            out[name] = torch.stack([sd[name].float() for sd in state_dicts]).mean(0).to(ref.dtype)
        else:
            out[name] = state_dicts[0][name].clone()
    return out


def weight_average(teachers: TeacherSet | Sequence[nn.Module]) -> nn.Module:
    """The uniform average of the teachers' weights (no alignment). Works only within one basin (shared
    initialisation); for teachers trained from scratch it is the expected failure baseline."""
    teachers = _as_set(teachers)
    names = list(teachers.shapes)
    sds = [{n: sd[n] for n in names} for sd in teachers.state_dicts]
    return teachers.build_student(_average(sds, sds[0]))


def aligned_average(teachers: TeacherSet | Sequence[nn.Module], anchor: int = 0, max_iter: int = 30) -> nn.Module:
    """Weight-match every teacher to the anchor (Git Re-Basin weight matching, data-free), then average.

    Families without channel-order groups (no permutation spec) fall back to the plain average.
    """
    teachers = _as_set(teachers)
    spec = teachers.family.permutation_spec(teachers.template)
    names = list(teachers.shapes)
    anchor_sd = {n: teachers.state_dicts[anchor][n] for n in names}
    aligned = []
    for k, sd in enumerate(teachers.state_dicts):
        sd = {n: sd[n] for n in names}
        if k == anchor or not spec:
            aligned.append(sd)
            continue
        perms = weight_matching(spec, anchor_sd, sd, max_iter=max_iter)
        aligned.append({n: permute_tensor(n, t, spec, perms) for n, t in sd.items()})
    # the anchor first, so integer counters come from it
    ordered = [aligned[anchor]] + [a for k, a in enumerate(aligned) if k != anchor]
    return teachers.build_student(_average(ordered, anchor_sd))


@torch.no_grad()
def recompute_bn(model: nn.Module, inputs: torch.Tensor, batch_size: int = 256, max_batches: int = 8) -> nn.Module:
    """Re-estimate every BatchNorm's running statistics on `inputs` (cumulative average over batches)."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return model
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    for i, start in enumerate(range(0, len(inputs), batch_size)):
        if i >= max_batches:
            break
        model(inputs[start : start + batch_size])
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    return model.eval()


def kd_targets(teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """The ensemble's tempered probabilities, mean over K of softmax(logits / T): `(K, N, C)` → `(N, C)`."""
    return F.softmax(teacher_logits.float() / temperature, dim=-1).mean(0)


def kd_loss_from_probs(
    logits: torch.Tensor, target_probs: torch.Tensor, labels: torch.Tensor, alpha: float, temperature: float
) -> torch.Tensor:
    """alpha · T² · KL(target ‖ student_T) + (1 − alpha) · CE(student, labels), mean over the batch."""
    log_p = F.log_softmax(logits.float() / temperature, dim=-1)
    kl = F.kl_div(log_p, target_probs, reduction="batchmean")
    loss = alpha * temperature**2 * kl
    if alpha < 1:
        loss = loss + (1 - alpha) * F.cross_entropy(logits.float(), labels)
    return loss


def kd_anchor(
    model: nn.Module,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    teacher_logits: torch.Tensor,
    steps: int = 1000,
    learning_rate: float = 3e-4,
    batch_size: int = 256,
    temperature: float = 4.0,
    alpha: float = 0.9,
    weight_decay: float = 0.01,
    seed: int = 0,
) -> nn.Module:
    """Fine-tune `model` (a copy of the anchor, changed in place) by KD on the ensemble of
    `teacher_logits` `(K, N, C)` over `inputs` (`N` rows, e.g. the meta split): AdamW at a constant
    `learning_rate`, random minibatches of `batch_size`. Returns the model in eval mode."""
    targets = kd_targets(teacher_logits, temperature)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=weight_decay)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        index = torch.randint(len(inputs), (batch_size,), generator=generator)
        loss = kd_loss_from_probs(logits_of(model(inputs[index])), targets[index], labels[index], alpha, temperature)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return model.eval()


def train_models(
    models: Sequence[nn.Module],
    inputs: torch.Tensor,
    labels: torch.Tensor,
    steps: int,
    batch_size: int = 128,
    lr: float = 2e-3,
    weight_decay: float = 1e-4,
    data_seeds: Sequence[int] | None = None,
    loss_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    progress: bool = False,
    desc: str = "training",
    batched: bool | None = None,
) -> list[nn.Module]:
    """`train_models_batched` (AdamW + one-cycle, own data order per model), or the same recipe in a plain
    loop, one model after another. `batched=None` picks the loop for a single model and for models with
    BatchNorm (which vmap cannot train).

    `loss_fn(logits (n, B, C), labels (n, B), index (n, B))` as in `train_models_batched` (n = 1 in the
    loop). Returns the same model objects, trained, in eval mode.
    """
    data_seeds = list(data_seeds) if data_seeds is not None else list(range(len(models)))
    if batched is None:
        batched = len(models) > 1 and not any(has_batchnorm(m) for m in models)
    if batched:
        return train_models_batched(
            models,
            inputs,
            labels,
            steps,
            batch_size=batch_size,
            lr=lr,
            weight_decay=weight_decay,
            data_seeds=data_seeds,
            loss_fn=loss_fn,
            progress=progress,
            desc=desc,
        )
    for model, seed in zip(models, data_seeds):
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: one_cycle(s, steps))
        generator = torch.Generator().manual_seed(seed)
        for _ in range(steps):
            index = torch.randint(len(inputs), (batch_size,), generator=generator)
            logits = logits_of(model(inputs[index]))
            if loss_fn is None:
                loss = F.cross_entropy(logits, labels[index])
            else:
                loss = loss_fn(logits[None], labels[index][None], index[None])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
        model.eval()
    return list(models)


def single_long(
    models: Sequence[nn.Module],
    inputs: torch.Tensor,
    labels: torch.Tensor,
    steps: int,
    data_seeds: Sequence[int] | None = None,
    **recipe,
) -> list[nn.Module]:
    """Fresh models trained with the teachers' recipe for `steps` (the benchmark uses 4× the teachers'
    budget): the "just train one model longer" alternative to an ensemble."""
    return train_models(models, inputs, labels, steps, data_seeds=data_seeds, **recipe)


def kd_converged(
    models: Sequence[nn.Module],
    inputs: torch.Tensor,
    labels: torch.Tensor,
    teacher_logits: Sequence[torch.Tensor],
    steps: int,
    temperature: float = 4.0,
    alpha: float = 0.9,
    data_seeds: Sequence[int] | None = None,
    **recipe,
) -> list[nn.Module]:
    """Distil fresh `models[i]` from scratch on the ensemble of `teacher_logits[i]` `(K_i, N, C)` over
    `inputs` (N rows), all at once, with the teachers' recipe (AdamW + one-cycle) for `steps`."""
    targets = torch.stack([kd_targets(t, temperature) for t in teacher_logits])  # (n, N, C)

    def loss_for(rows: torch.Tensor):
        def loss_fn(logits: torch.Tensor, batch_labels: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
            n, batch, classes = logits.shape
            target = targets[rows[:, None], index]  # (n, B, C)
            loss = kd_loss_from_probs(
                logits.reshape(n * batch, classes),
                target.reshape(n * batch, classes),
                batch_labels.reshape(-1),
                alpha,
                temperature,
            )
            return loss * n  # the sum over models: each model gets the gradient of its own mean loss

        return loss_fn

    seeds = list(data_seeds) if data_seeds is not None else list(range(len(models)))
    if recipe.get("batched", len(models) > 1 and not any(has_batchnorm(m) for m in models)):
        rows = torch.arange(len(models))
        return train_models(models, inputs, labels, steps, data_seeds=seeds, loss_fn=loss_for(rows), **recipe)
    recipe["batched"] = False
    for i, (model, seed) in enumerate(zip(models, seeds)):
        train_models([model], inputs, labels, steps, data_seeds=[seed], loss_fn=loss_for(torch.tensor([i])), **recipe)
    return list(models)
