"""One-model alternatives to WeightFormer that users reach for, each returning a model in eval mode.

Merges (`TeacherSet` in, one model of the teachers' architecture out):

- `uniform_soup`: the uniform average of the teachers' weights (Wortsman et al. 2022). Works within one basin
  (fine-tunes of one base, shared initialisation); for teachers trained from scratch it collapses.
- `greedy_soup`: teachers ordered by validation accuracy, each added to the soup if the soup's validation
  accuracy does not drop (Wortsman et al. 2022, recipe 1).
- `task_arithmetic`: base + λ · mean of the task vectors (teacher − base); λ = 1 is the uniform soup. λ is
  chosen on validation (Ilharco et al. 2023 sum the task vectors; the mean is the same family, rescaled by K).
- `ties_merge`: TIES-merging (Yadav et al. 2023): trim each task vector to its top-k % magnitudes (per
  tensor, as mergekit does), elect each entry's sign by the summed trimmed vectors, average the entries that
  agree with it (disjoint mean), base + λ · merged; k and λ chosen on validation.
- `aligned_average`: Git Re-Basin weight matching of every teacher to the anchor, then the average.
- `single_best_val`: the teacher with the best validation accuracy.

Distillation: `kd_anchor`, the anchor fine-tuned by KD on the ensemble (the cheap practical alternative).

Validation data is always the meta split, never the test split. Every `score` argument is a function
`model -> float` (higher is better) that the caller builds on validation data, so these functions never see
test labels. Integer tensors (BatchNorm's `num_batches_tracked`) are taken from the base, else the first
teacher.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from .alignment import permute_tensor, weight_matching
from .evaluation import logits_of
from .teachers import TeacherSet, as_teacher_set

Score = Callable[[nn.Module], float]
State = dict[str, torch.Tensor]


def _states(teachers: TeacherSet) -> list[State]:
    names = list(teachers.shapes)
    return [{n: sd[n] for n in names} for sd in teachers.state_dicts]


def _average(states: Sequence[Mapping[str, torch.Tensor]]) -> State:
    """Uniform average of floating tensors; integer tensors are taken from the first state."""
    out = {}
    for name, ref in states[0].items():
        if ref.is_floating_point():
            out[name] = torch.stack([sd[name].float() for sd in states]).mean(0).to(ref.dtype)
        else:
            out[name] = ref.clone()
    return out


def uniform_soup(teachers: TeacherSet | Sequence[nn.Module]) -> nn.Module:
    """The uniform average of the teachers' weights (no alignment)."""
    teachers = as_teacher_set(teachers)
    return teachers.build_student(_average(_states(teachers)))


def best_index(scores: Sequence[float]) -> int:
    """The index of the highest score, the first of equals: how every "best teacher" here is picked
    (`single_best_val`, `weightformer generate --anchor best`, `examples/train.py`'s best-val anchor)."""
    return max(range(len(scores)), key=lambda i: (scores[i], -i))


def single_best_val(teachers: TeacherSet | Sequence[nn.Module], score: Score) -> int:
    """The index of the teacher with the best validation score (the first of equals)."""
    teachers = as_teacher_set(teachers)
    return best_index([score(teachers.model(i)) for i in range(len(teachers))])


def greedy_soup(
    teachers: TeacherSet | Sequence[nn.Module], score: Score, prepare: Callable[[nn.Module], nn.Module] | None = None
) -> tuple[nn.Module, list[int]]:
    """Greedy soup: start from the best teacher on validation, add the next best if the soup's validation
    score does not drop. `prepare` runs on every soup of two or more before scoring (e.g. BatchNorm
    re-estimation); single teachers are scored as they are, as `single_best_val` scores them.
    Returns the soup and the indices of the teachers it kept, best first."""
    teachers = as_teacher_set(teachers)
    prepare = prepare or (lambda m: m)
    states = _states(teachers)
    scores = [score(teachers.model(i)) for i in range(len(teachers))]  # a teacher is itself: nothing to prepare
    order = sorted(range(len(teachers)), key=lambda i: (-scores[i], i))
    kept, best = [order[0]], scores[order[0]]
    for i in order[1:]:
        candidate = prepare(teachers.build_student(_average([states[j] for j in kept + [i]])))
        value = score(candidate)
        if value >= best:
            kept, best = kept + [i], value
    if len(kept) == 1:
        return teachers.model(kept[0]), kept
    return prepare(teachers.build_student(_average([states[j] for j in kept]))), kept


def task_vector_merge(base: State, states: Sequence[State], lam: float, density: float | None = None) -> State:
    """base + λ · merged task vectors: their mean (`density=None`), or TIES with the top `density` fraction of
    each task vector's entries (per tensor) kept, signs elected by the sum, and the disjoint mean."""
    out = {}
    for name, ref in base.items():
        if not ref.is_floating_point():
            out[name] = ref.clone()
            continue
        tau = torch.stack([sd[name].float() - ref.float() for sd in states])  # (K, *shape)
        if density is None:
            merged = tau.mean(0)
        else:
            flat = tau.reshape(len(states), -1)
            keep = max(1, round(density * flat.shape[1]))
            threshold = flat.abs().kthvalue(flat.shape[1] - keep + 1, dim=1, keepdim=True).values
            trimmed = torch.where(flat.abs() >= threshold, flat, torch.zeros_like(flat))
            sign = torch.sign(trimmed.sum(0))
            agree = (torch.sign(trimmed) == sign) & (trimmed != 0)
            merged = (trimmed * agree).sum(0) / agree.sum(0).clamp_min(1)
            merged = merged.reshape(ref.shape)
        out[name] = (ref.float() + lam * merged).to(ref.dtype)
    return out


def _choose(
    teachers: TeacherSet, base: TeacherSet, grid: Sequence[tuple], score: Score, prepare
) -> tuple[nn.Module, tuple]:
    base_state = _states(base)[0]
    states = _states(teachers)
    best = None
    for setting in grid:
        model = prepare(teachers.build_student(task_vector_merge(base_state, states, *setting)))
        value = score(model)
        if best is None or value > best[0]:
            best = (value, setting, model)
    return best[2], best[1]


def task_arithmetic(
    teachers: TeacherSet | Sequence[nn.Module],
    base: TeacherSet | nn.Module,
    score: Score,
    lambdas: Sequence[float] = (0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0),
    prepare: Callable[[nn.Module], nn.Module] | None = None,
) -> tuple[nn.Module, float]:
    """base + λ · mean task vector, λ chosen on validation. Returns the model and λ."""
    teachers, base = as_teacher_set(teachers), as_teacher_set([base] if isinstance(base, nn.Module) else base)
    model, (lam,) = _choose(teachers, base, [(lam,) for lam in lambdas], score, prepare or (lambda m: m))
    return model, lam


def ties_merge(
    teachers: TeacherSet | Sequence[nn.Module],
    base: TeacherSet | nn.Module,
    score: Score,
    densities: Sequence[float] = (0.1, 0.2, 0.5, 1.0),
    lambdas: Sequence[float] = (0.5, 1.0, 1.5, 2.0),
    prepare: Callable[[nn.Module], nn.Module] | None = None,
) -> tuple[nn.Module, dict[str, float]]:
    """TIES-merging with the density k and the scale λ chosen on validation. Returns the model and both."""
    teachers, base = as_teacher_set(teachers), as_teacher_set([base] if isinstance(base, nn.Module) else base)
    grid = [(lam, k) for k in densities for lam in lambdas]
    model, (lam, k) = _choose(teachers, base, grid, score, prepare or (lambda m: m))
    return model, {"density": k, "lambda": lam}


def aligned_average(teachers: TeacherSet | Sequence[nn.Module], anchor: int = 0, max_iter: int = 30) -> nn.Module:
    """Weight-match every teacher to the anchor (Git Re-Basin weight matching, data-free), then average.

    Families without channel-order groups (no permutation spec) fall back to the plain average.
    """
    teachers = as_teacher_set(teachers)
    spec = teachers.family.permutation_spec(teachers.template)
    states = _states(teachers)
    aligned = []
    for k, sd in enumerate(states):
        if k == anchor or not spec:
            aligned.append(sd)
            continue
        perms = weight_matching(spec, states[anchor], sd, max_iter=max_iter)
        aligned.append({n: permute_tensor(n, t, spec, perms) for n, t in sd.items()})
    # the anchor first, so integer counters come from it
    return teachers.build_student(_average([aligned[anchor]] + [a for k, a in enumerate(aligned) if k != anchor]))


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
    """Fine-tune `model` (a copy of the anchor, changed in place) by KD on the ensemble of `teacher_logits`
    `(K, N, C)` over `inputs` (`N` rows, e.g. the meta split): AdamW at a constant `learning_rate`, random
    minibatches of `batch_size`. Returns the model in eval mode."""
    from .training import distillation_loss, ensemble_targets

    targets = ensemble_targets(teacher_logits, temperature)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=weight_decay)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        index = torch.randint(len(inputs), (batch_size,), generator=generator)
        loss = distillation_loss(logits_of(model(inputs[index])), targets[index], labels[index], alpha, temperature)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return model.eval()
