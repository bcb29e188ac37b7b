"""How far does plain KD from the anchor get on the validation sets of `generator_design.py`?

The generator learns one forward pass that should move an anchor towards its set's ensemble; this runs the
per-set optimisation it amortises (AdamW on the same objective and meta split, `baselines.kd_anchor`) for
several budgets, so its G says what the objective and data allow. Validation sets only (teachers 232–255).

    OMP_NUM_THREADS=1 python examples/experiments/kd_ceiling.py --pool mlp_scratch --steps 1000 3000 10000

With `--generator DIR` (a generator saved by `generator_design.py --save_generator`) KD starts from the set's
generated student instead of its anchor: what `weightformer generate --finetune-steps N` does.
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarking import report  # noqa: E402
from validation import load_run, validation_sets, with_fresh_meta  # noqa: E402

from weightformer_hf import baselines  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pool", default="mlp_scratch", choices=["mlp_scratch", "mlp_finetune"])
    p.add_argument("--num_val_teachers", type=int, default=24)
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--steps", type=int, nargs="+", default=[1000, 3000, 10000])
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--batch_size", type=int, default=256)
    p.add_argument("--alpha", type=float, default=0.3)
    p.add_argument("--temperature", type=float, default=4.0)
    p.add_argument(
        "--one_step",
        type=float,
        nargs="+",
        metavar="LR",
        help="instead: one plain gradient step on the first --batch_size meta examples, at each of these learning "
        "rates (the most a single gradient-shaped update can give)",
    )
    p.add_argument("--generator", metavar="DIR", help="start from the student this saved generator makes of each set")
    p.add_argument("--heldout", action="store_true",
                   help="the benchmark's held-out (test) sets instead of the validation sets: only to check a "
                   "choice already made on the validation sets")  # fmt: skip
    p.add_argument("--trainable", help="regex: only parameters whose names match are trained (default: all)")
    p.add_argument(
        "--meta_samples",
        type=int,
        default=0,
        help="distil on a fresh MNIST-1D draw of this many samples (seed 4242), as generator_design.py's flag; "
        "0 = the meta split",
    )
    args = p.parse_args(argv)
    if args.heldout and args.meta_samples:
        raise SystemExit("--meta_samples computes fresh logits for the validation teachers only; not with --heldout")
    if args.one_step and args.meta_samples:  # before the pool is loaded
        raise SystemExit("--one_step reads the meta split; it does not combine with --meta_samples")
    torch.set_num_threads(1)
    run = load_run(args.pool)
    teachers, data = run.teachers, run.data
    # the benchmark's own held-out sets, for a check after a choice made on the validation sets
    sets = run.plan.heldout_sets()[args.k] if args.heldout else validation_sets(run.plan, args.num_val_teachers, args.k)
    meta_logits = run.meta_logits
    if args.meta_samples:
        from benchmarking.methods import stacked_logits

        data = with_fresh_meta(data, args.meta_samples)
        val = teachers.subset(range(sets[0][0], sets[-1][-1] + 1))  # the validation teachers only, not all 280
        fresh = stacked_logits(val, data.meta_x)
        meta_logits = {m: fresh[m - sets[0][0]] for s in sets for m in s}
    anchors = [run.row(args.k, i, "anchor", run.test_probs[m[0]], m, 0.0)["gain_recovered"] for i, m in enumerate(sets)]
    out = {"pool": args.pool, "trainable": args.trainable, "lr": args.lr, "batch_size": args.batch_size,
           "alpha": args.alpha, "meta_samples": args.meta_samples or len(data.meta_x), "anchor_G": anchors}  # fmt: skip
    if args.one_step:
        return _one_step(args, run, teachers, data, sets, anchors)
    generator = None
    if args.generator:
        from weightformer_hf import WeightFormerModel

        generator = WeightFormerModel.from_pretrained(args.generator).eval()
        out["generator"] = args.generator
    for i, members in enumerate(sets):  # one run per set, evaluated at each budget on the way
        start = time.perf_counter()
        if generator is None:
            model, done = copy.deepcopy(teachers.model(members[0])), 0
        else:
            model, done = run.prepare(generator.generate_student(teachers.subset(members), anchor=0)), 0
            g = run.row(args.k, i, "wf", run.test_probs_of(model), members, 0.0)["gain_recovered"]
            out.setdefault("0", []).append(g)
        for name, param in model.named_parameters():
            param.requires_grad_(args.trainable is None or re.search(args.trainable, name) is not None)
        for steps in sorted(args.steps):
            model = baselines.kd_anchor(
                model.train(), data.meta_x, data.meta_y, _stack(meta_logits, members), steps=steps - done,
                learning_rate=args.lr, batch_size=args.batch_size, temperature=args.temperature, alpha=args.alpha,
                seed=done,
            )  # fmt: skip
            done = steps
            g = run.row(args.k, i, "kd", run.test_probs_of(model), members, 0.0)["gain_recovered"]
            out.setdefault(str(steps), []).append(g)
            print(f"set {i} steps {steps}: G {g:.3f} ({time.perf_counter() - start:.0f}s)", flush=True)
    for steps in ([0] if generator is not None else []) + sorted(args.steps):
        g = out[str(steps)]
        paired = report.mean_ci([a - b for a, b in zip(g, anchors)])
        print(f"{steps} steps: G {report.mean_ci(g)[0]:.3f} ± {report.mean_ci(g)[1]:.3f}, paired {paired[0]:+.3f} ± "
              f"{paired[1]:.3f}, per set " + " / ".join(f"{x:.2f}" for x in g))  # fmt: skip
    print(json.dumps(out))


def _stack(logits, members: list[int]) -> torch.Tensor:
    """The `(K, N, C)` logits of `members`, from the pool's stacked logits or a dict of some teachers'."""
    return torch.stack([logits[m] for m in members])


def _one_step(args, run, teachers, data, sets, anchors) -> None:
    from weightformer_hf import training
    from weightformer_hf.evaluation import logits_of

    x, y = data.meta_x[: args.batch_size], data.meta_y[: args.batch_size]
    gains: dict[float, list[float]] = {}
    for i, members in enumerate(sets):
        targets = training.ensemble_targets(run.meta_logits[members][:, : args.batch_size], args.temperature)
        anchor = teachers.model(members[0]).train()
        loss = training.distillation_loss(logits_of(anchor(x)), targets, y, args.alpha, args.temperature)
        grads = torch.autograd.grad(loss, list(anchor.parameters()))
        for lr in args.one_step:
            model = copy.deepcopy(anchor)
            with torch.no_grad():
                for param, grad in zip(model.parameters(), grads):
                    param -= lr * grad
            g = run.row(args.k, i, "step", run.test_probs_of(model.eval()), members, 0.0)["gain_recovered"]
            gains.setdefault(lr, []).append(g - anchors[i])
    for lr, paired in gains.items():
        print(f"one step, lr {lr}, batch {args.batch_size}: paired {report.mean_ci(paired)[0]:+.3f} ± "
              f"{report.mean_ci(paired)[1]:.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
