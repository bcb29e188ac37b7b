"""Closed-form, data-aware merges of K from-scratch MLPs: can least squares on a probe batch bring the other
teachers in, where the generator (v9) does not read them?

Each merge keeps the anchor's architecture and solves every refit layer in closed form (ridge regression on
the meta split's 10,000 inputs, no labels, no gradient steps), layer by layer on the merged network's own
activations:

- `refit_classifier`: the anchor's hidden layers; the classifier regressed onto the ensemble's mean logits.
- `aligned_mean`: every hidden layer regressed onto the mean of the K teachers' pre-activations, each
  teacher's units matched to the anchor's by activation correlation (`linear_sum_assignment`); the classifier
  as above. Layer 1 is linear in the inputs, so there this is the aligned weight average.
- `aligned_mean_keep_l1`: the same with the anchor's first layer kept.

Validation sets only (teachers 232–255 of `mlp_scratch`, anchor first), G on the test split.

    OMP_NUM_THREADS=1 python examples/experiments/closed_form_merge.py
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from scipy.optimize import linear_sum_assignment

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from validation import load_run, validation_sets  # noqa: E402

from weightformer_hf.evaluation import ensemble_probs, gain_recovered  # noqa: E402

T_975_5DOF = 2.571  # 6 sets: Student t, 5 degrees of freedom


def layers_of(run, index: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(weight, bias) of each Linear of an `MLPClassifier`, float64."""
    state = run.teachers.model(index).state_dict()
    names = sorted({n.rsplit(".", 1)[0] for n in state}, key=lambda n: int(n.split(".")[-1]))
    return [(state[f"{n}.weight"].double(), state[f"{n}.bias"].double()) for n in names]


def forward(layers, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Pre-activations of every layer and post-ReLU activations of every hidden layer."""
    h, pre, post = x.double(), [], []
    for i, (w, b) in enumerate(layers):
        z = h @ w.T + b
        pre.append(z)
        if i < len(layers) - 1:
            h = z.relu()
            post.append(h)
    return pre, post


def match(anchor_act: torch.Tensor, other_act: torch.Tensor) -> torch.Tensor:
    """The order of `other`'s units that best correlates with the anchor's (activation matching)."""

    def standardise(a):
        return (a - a.mean(0)) / (a.std(0) + 1e-6)

    corr = standardise(anchor_act).T @ standardise(other_act) / len(anchor_act)
    return torch.as_tensor(linear_sum_assignment(-corr.numpy())[1])


def ridge(inputs: torch.Tensor, targets: torch.Tensor, strength: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) minimising ‖inputs Wᵀ + b − targets‖² + strength · N · ‖[W, b]‖²."""
    x = torch.cat([inputs, torch.ones(len(inputs), 1, dtype=inputs.dtype)], 1)
    gram = x.T @ x + strength * len(x) * torch.eye(x.shape[1], dtype=x.dtype)
    solution = torch.linalg.solve(gram, x.T @ targets)
    return solution[:-1].T.contiguous(), solution[-1].contiguous()


def merge(teacher_layers, probe: torch.Tensor, mode: str, strength: float):
    """The merged layers (anchor first in `teacher_layers`)."""
    passes = [forward(layers, probe) for layers in teacher_layers]
    anchor_pre, anchor_post = passes[0]
    h, merged, last = probe.double(), [], len(teacher_layers[0]) - 1
    for i in range(last + 1):
        if i == last:
            target = torch.stack([pre[-1] for pre, _ in passes]).mean(0)
        else:
            aligned = [anchor_pre[i]] + [pre[i][:, match(anchor_post[i], post[i])] for pre, post in passes[1:]]
            target = torch.stack(aligned).mean(0)
        keep = (mode == "refit_classifier" and i < last) or (mode == "aligned_mean_keep_l1" and i == 0)
        w, b = teacher_layers[0][i] if keep else ridge(h, target, strength)
        merged.append((w, b))
        z = h @ w.T + b
        h = z.relu() if i < last else z
    return merged


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--num_val_teachers", type=int, default=24)
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--ridge", type=float, nargs="+", default=[1e-4, 1e-3, 1e-2])
    args = p.parse_args(argv)
    torch.set_grad_enabled(False)
    run = load_run("mlp_scratch")
    probe, test_x, test_y = run.data.meta_x, run.data.test_x, run.data.test_y
    variants = [("refit_classifier", s) for s in args.ridge]
    variants += [(m, s) for m in ("aligned_mean", "aligned_mean_keep_l1") for s in args.ridge]
    paired: dict[tuple[str, float], list[float]] = {v: [] for v in variants}
    for members in validation_sets(run.plan, args.num_val_teachers, args.k):
        teacher_layers = [layers_of(run, i) for i in members]
        singles = [(forward(t, test_x)[0][-1].argmax(-1) == test_y).double().mean().item() for t in teacher_layers]
        ensemble = (ensemble_probs(list(run.test_logits[members])).argmax(-1) == test_y).double().mean().item()
        mean_single = statistics.mean(singles)
        anchor_gain = gain_recovered(singles[0], mean_single, ensemble)
        line = f"set {members}: anchor G {anchor_gain:.3f}"
        for mode, strength in variants:
            start = time.perf_counter()
            merged = merge(teacher_layers, probe, mode, strength)
            accuracy = (forward(merged, test_x)[0][-1].argmax(-1) == test_y).double().mean().item()
            gain = gain_recovered(accuracy, mean_single, ensemble)
            paired[(mode, strength)].append(gain - anchor_gain)
            line += f" | {mode} {strength:g}: G {gain:.3f} ({time.perf_counter() - start:.1f} s)"
        print(line, flush=True)
    print("paired gain over the anchor (mean ± 95 % CI half-width over sets):")
    for (mode, strength), gains in paired.items():
        half = T_975_5DOF * statistics.stdev(gains) / len(gains) ** 0.5
        print(f"  {mode:22s} ridge {strength:g}: {statistics.mean(gains):+.3f} ± {half:.3f}")


if __name__ == "__main__":
    main()
