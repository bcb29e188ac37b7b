"""The merge and distillation baselines against hand-computed cases, and the vectorised teacher trainer."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from weightformer_hf import TeacherSet, baselines
from weightformer_hf.reference_models import MLPClassifier, MLPClassifierConfig
from weightformer_hf.teacher_training import one_cycle, train_models


def _mlp(seed: int, hidden=(4,)) -> MLPClassifier:
    torch.manual_seed(seed)
    return MLPClassifier(MLPClassifierConfig(in_features=3, hidden_sizes=hidden, num_labels=2))


def _with(model: MLPClassifier, value: float) -> MLPClassifier:
    """A copy whose every parameter is the constant `value` (hand-computable merges)."""
    out = copy.deepcopy(model)
    with torch.no_grad():
        for p in out.parameters():
            p.fill_(value)
    return out


def _first_weight(model: nn.Module) -> torch.Tensor:
    return next(model.parameters()).detach()


def test_uniform_soup_is_the_mean():
    models = [_mlp(s) for s in range(3)]
    soup = baselines.uniform_soup(models)
    for name, value in soup.state_dict().items():
        torch.testing.assert_close(value, sum(m.state_dict()[name] for m in models) / 3, msg=name)


def test_greedy_soup_adds_only_what_does_not_hurt():
    """Score −|w − 1| of constant-weight teachers. At 1, 3, −1 (scores 0, −2, −2): the soups {1, 3} = 2 and
    {1, −1} = 0 both score −1 < 0, so only teacher 0 stays. At 1.5, 0.5, 4 (−0.5, −0.5, −3): {1.5, 0.5} = 1
    scores 0 and is kept; adding 4 gives 2 (−1) and is refused."""
    base = _mlp(0)
    teachers = [_with(base, 1.0), _with(base, 3.0), _with(base, -1.0)]

    def score(model):
        return -(_first_weight(model) - 1.0).abs().mean().item()

    soup, kept = baselines.greedy_soup(teachers, score)
    assert kept == [0]
    assert torch.equal(_first_weight(soup), torch.ones_like(_first_weight(soup)))
    teachers = [_with(base, 1.5), _with(base, 0.5), _with(base, 4.0)]  # 1.5 and 0.5 tie; their mean is 1: better
    soup, kept = baselines.greedy_soup(teachers, score)
    assert kept == [0, 1]
    torch.testing.assert_close(_first_weight(soup), torch.ones_like(_first_weight(soup)))


def test_single_best_val_picks_the_best_score():
    base = _mlp(0)
    teachers = [_with(base, v) for v in (0.2, 0.9, 0.5)]
    assert baselines.single_best_val(teachers, lambda m: _first_weight(m).mean().item()) == 1


def test_ties_merge_hand_computed():
    """Task vectors (2 teachers, 4 entries): [4, -1, 2, 0.5] and [-3, -2, 1, 0.1]; density 0.5 keeps the two
    largest magnitudes of each: [4, 0, 2, 0] and [-3, -2, 0, 0]; elected signs of the sums [1, -2, 2, 0]:
    [+, −, +, 0]; disjoint means: [4, −2, 2, 0]; base 10, λ 0.5 → [12, 9, 11, 10]."""
    base = {"w": torch.full((4,), 10.0), "n": torch.tensor(7)}
    states = [{"w": base["w"] + torch.tensor([4.0, -1.0, 2.0, 0.5]), "n": torch.tensor(1)},
              {"w": base["w"] + torch.tensor([-3.0, -2.0, 1.0, 0.1]), "n": torch.tensor(2)}]  # fmt: skip
    merged = baselines.task_vector_merge(base, states, lam=0.5, density=0.5)
    torch.testing.assert_close(merged["w"], torch.tensor([12.0, 9.0, 11.0, 10.0]))
    assert merged["n"] == 7  # integer counters come from the base
    mean = baselines.task_vector_merge(base, states, lam=1.0)  # task arithmetic with λ = 1: the uniform soup
    torch.testing.assert_close(mean["w"], (states[0]["w"] + states[1]["w"]) / 2)


def test_task_arithmetic_and_ties_choose_on_the_score():
    base = _with(_mlp(0), 0.0)
    teachers = [_with(base, 1.0), _with(base, 3.0)]  # mean task vector 2

    def score(model):  # best at weight 3: λ = 1.5
        return -(_first_weight(model) - 3.0).abs().mean().item()

    model, lam = baselines.task_arithmetic(teachers, base, score)
    assert lam == 1.5
    torch.testing.assert_close(_first_weight(model), torch.full_like(_first_weight(model), 3.0))
    model, chosen = baselines.ties_merge(teachers, base, score)
    assert chosen["lambda"] == 1.5 and chosen["density"] == 0.1  # all densities tie on constants: the first wins


def test_kd_anchor_moves_towards_the_ensemble():
    torch.manual_seed(0)
    x = torch.randn(256, 3)
    teachers = [_mlp(s, hidden=(8,)) for s in range(3)]
    with torch.no_grad():
        logits = torch.stack([t(x).logits for t in teachers])
    from weightformer_hf.training import kd_loss

    anchor = copy.deepcopy(teachers[0])
    before = kd_loss(anchor(x).logits, logits, torch.zeros(256, dtype=torch.long), 1.0, 4.0).item()
    tuned = baselines.kd_anchor(anchor, x, torch.zeros(256, dtype=torch.long), logits, steps=200,
                                learning_rate=1e-2, alpha=1.0, batch_size=64)  # fmt: skip
    with torch.no_grad():
        after = kd_loss(tuned(x).logits, logits, torch.zeros(256, dtype=torch.long), 1.0, 4.0).item()
    assert after < 0.5 * before
    assert not tuned.training


def _reference_adamw(model, x, y, steps, lr, seed, batch_size=32):
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: one_cycle(s, steps))
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        index = torch.randint(len(x), (batch_size,), generator=generator)
        loss = nn.functional.cross_entropy(model(x[index]).logits, y[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
    return model


def test_vectorised_trainer_equals_torch_adamw_per_model():
    """Two models trained at once under vmap, with their own learning rates and data orders, end where
    `torch.optim.AdamW` + the same one-cycle schedule takes each of them alone."""
    torch.manual_seed(0)
    x, y = torch.randn(200, 3), torch.randint(2, (200,))
    models = [_mlp(1, hidden=(6,)), _mlp(2, hidden=(6,))]
    references = [_reference_adamw(copy.deepcopy(m), x, y, 30, lr, seed)
                  for m, lr, seed in zip(models, (1e-2, 3e-3), (5, 6))]  # fmt: skip
    train_models(models, x, y, 30, batch_size=32, lr=[1e-2, 3e-3], weight_decay=1e-4, data_seeds=[5, 6])
    for model, reference in zip(models, references):
        for (name, a), b in zip(model.named_parameters(), reference.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
        assert not model.training


def test_vectorised_trainer_checks_learning_rates():
    with pytest.raises(ValueError, match="3 learning rates for 2 models"):
        train_models([_mlp(0), _mlp(1)], torch.randn(8, 3), torch.zeros(8, dtype=torch.long), 1, lr=[1, 2, 3])


def test_aligned_average_of_a_permuted_copy_is_the_anchor():
    model = _mlp(0, hidden=(5,))
    permuted = copy.deepcopy(model)
    perm = torch.tensor([3, 0, 4, 1, 2])
    with torch.no_grad():  # hidden units reordered: the same function
        permuted.net[0].weight.copy_(model.net[0].weight[perm])
        permuted.net[0].bias.copy_(model.net[0].bias[perm])
        permuted.net[2].weight.copy_(model.net[2].weight[:, perm])
    average = baselines.aligned_average(TeacherSet.from_models([model, permuted]), anchor=0)
    for name, value in average.state_dict().items():
        torch.testing.assert_close(value, model.state_dict()[name], msg=name)
