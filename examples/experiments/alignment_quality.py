"""How well do the teachers line up after alignment? Weight matching against activation matching.

For each validation set of `generator_design.py` (teachers 232–255 of an MNIST-1D MLP pool), every other
teacher is aligned to the set's first teacher, by the library's weight matching or by activation matching
(one linear assignment per hidden layer on the correlation of unit activations over meta inputs, layer by
layer), and two things are measured: the mean correlation of a matched last-hidden unit with the anchor's,
and G of the aligned average (a soup of the aligned set). A soup near the anchor's G would mean the
aligned teachers share a basin; far below, that any mix of their weights leaves it.

    OMP_NUM_THREADS=1 python examples/experiments/alignment_quality.py --pool mlp_scratch
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from scipy.optimize import linear_sum_assignment

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarking import report  # noqa: E402
from validation import load_run, validation_sets  # noqa: E402

from weightformer_hf.alignment import align_to_anchor, permute_tensor  # noqa: E402


def hidden_activations(state: dict, x: torch.Tensor) -> list[torch.Tensor]:
    """The ReLU activations of each hidden layer of an MNIST-1D MLP (`net.0`, `net.2`, ...; classifier last)."""
    names = sorted({k.rsplit(".", 1)[0] for k in state}, key=lambda n: int(n.split(".")[1]))
    out, h = [], x
    for name in names[:-1]:
        h = torch.relu(h @ state[f"{name}.weight"].T + state[f"{name}.bias"])
        out.append(h)
    return out


def correlation(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a = (a - a.mean(0)) / (a.std(0) + 1e-6)
    b = (b - b.mean(0)) / (b.std(0) + 1e-6)
    return a.T @ b / len(a)


def activation_matching(spec: dict, anchor: dict, other: dict, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per hidden group, the permutation of `other`'s units that best correlates with `anchor`'s, layer by layer
    (a layer is matched on inputs already permuted by the layers before it)."""
    groups = [g for g in dict.fromkeys(g for groups, _ in spec.values() for g in groups if g is not None)]
    reference, perms = hidden_activations(anchor, x), {}
    for depth, group in enumerate(groups):
        aligned = {n: permute_tensor(n, v, spec, perms) for n, v in other.items()}
        ours = hidden_activations(aligned, x)[depth]
        _, cols = linear_sum_assignment(correlation(reference[depth], ours).numpy(), maximize=True)
        perms[group] = torch.as_tensor(cols)
    return perms


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pool", default="mlp_scratch", choices=["mlp_scratch", "mlp_finetune"])
    p.add_argument("--num_val_teachers", type=int, default=24)
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--probe", type=int, default=2000, help="meta inputs the activations are read on")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    run = load_run(args.pool)
    teachers, data = run.teachers, run.data
    spec = teachers.family.permutation_spec(teachers.template)
    x = data.meta_x[: args.probe]
    sets = validation_sets(run.plan, args.num_val_teachers, args.k)
    for kind in ("weight matching", "activation matching"):
        gains, correlations = [], []
        for i, members in enumerate(sets):
            subset = teachers.subset(members)
            states = [teachers.state_dicts[m] for m in members]
            aligned = [states[0]]
            for k in range(1, len(members)):
                if kind == "weight matching":
                    perms = align_to_anchor(subset, 0, k, spec)
                else:
                    perms = activation_matching(spec, states[0], states[k], x)
                aligned.append({n: permute_tensor(n, v, spec, perms) for n, v in states[k].items()})
                last = correlation(hidden_activations(states[0], x)[-1], hidden_activations(aligned[-1], x)[-1])
                correlations.append(torch.diagonal(last).mean().item())
            average = {n: sum(a[n] for a in aligned) / len(aligned) for n in states[0]}
            soup = teachers.build_student(average).eval()
            gains.append(run.row(args.k, i, "soup", run.test_probs_of(soup), members, 0.0)["gain_recovered"])
        g, corr = report.mean_ci(gains), sum(correlations) / len(correlations)
        print(f"{kind}: aligned average G {g[0]:.2f} ± {g[1]:.2f}, matched last-hidden unit correlation {corr:.2f}")


if __name__ == "__main__":
    main()
