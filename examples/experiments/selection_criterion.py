"""Which validation criterion should choose the generator to keep? (issue #9, not-tried item 8)

A small pool is carved out of a 280-teacher benchmark pool's *training* teachers: replicate r trains the
generator on teachers 16r … 16r+11 and keeps 16r+12 … 16r+15 as its selection teachers (the benchmark's
12 + 4 split of `mlp_shared_init` and `cnn_scratch`). `--val_data_fraction` of the meta split never reaches a
training batch. Every `--eval_every` steps the run records
- the selection teachers' students (every member as anchor, K = 2 and 4, `training.validation_sets`) scored
  with the training objective and accuracy, on the held-out meta rows and on 2,000 rows it trains on;
- the dev sets' students: the validation protocol's 6 disjoint sets of teachers 232–255 (anchor first),
  scored on the MNIST-1D test split.
No selection happens inside the run; each criterion is applied to the recorded curve afterwards
(`--analyse`), so every criterion is judged on the same generators. The benchmark's held-out teachers
(256–279) are never loaded as sets.

    OMP_NUM_THREADS=1 python examples/experiments/selection_criterion.py --pool mlp_scratch --replicate 0
    python examples/experiments/selection_criterion.py --analyse
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarking import methods, plans, report  # noqa: E402
from validation import validation_sets  # noqa: E402

from weightformer_hf import training  # noqa: E402
from weightformer_hf.hub import no_progress_bars  # noqa: E402
from weightformer_hf.training import EpisodeConfig  # noqa: E402

RUNS = Path(__file__).resolve().parents[2] / "docs" / "experiments" / "selection_runs.jsonl"


def criteria(curve: list[dict]) -> dict[str, int]:
    """Index into `curve` each criterion keeps (ties: the earliest step, as `train_generator`)."""

    def argbest(key, sign):
        return min(range(len(curve)), key=lambda i: (sign * key(curve[i]), curve[i]["step"]))

    def one_se(key, index, sign, paired):
        """The earliest step whose score is within one standard error of the best step's (Breiman's rule:
        the simplest model the noise cannot tell from the best); `paired` uses the SE of the per-set
        differences from the best step."""
        best = argbest(lambda c: sum(sign * x[index] for x in c[key]), 1)
        n = len(curve[best][key])
        for i, c in enumerate(curve):
            diffs = [sign * (a[index] - b[index]) for a, b in zip(c[key], curve[best][key])]
            values = diffs if paired else [sign * b[index] for b in curve[best][key]]
            mean = sum(values) / n
            se = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)
            if sum(diffs) / n <= se:
                return i
        return best

    rules = {}
    if "trained_sets" in curve[0]:
        rules = {
            "loss, trained rows, one-SE rule": one_se("trained_sets", 0, 1, False),
            "loss, trained rows, paired one-SE rule": one_se("trained_sets", 0, 1, True),
            "accuracy, held-out rows, one-SE rule": one_se("heldout_sets", 1, -1, False),
        }
    return {
        **rules,
        "last step": len(curve) - 1,
        "loss, trained rows (v13)": argbest(lambda c: c["trained"]["loss"], 1),
        "loss, held-out rows (v13c)": argbest(lambda c: c["heldout"]["loss"], 1),
        "accuracy, held-out rows": argbest(lambda c: c["heldout"]["accuracy"], -1),
        "accuracy, trained rows": argbest(lambda c: c["trained"]["accuracy"], -1),
        "dev oracle (ceiling, not a criterion)": argbest(lambda c: sum(c["dev_acc"]), -1),
    }


def analyse(path: Path = RUNS) -> None:
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    latest = {(r["pool"], r["replicate"]): r for r in records}  # a rerun (with per-set scores) replaces a run
    records = list(latest.values())
    for pool in sorted({r["pool"] for r in records}):
        runs = [r for r in records if r["pool"] == pool]
        print(f"\n{pool}: {len(runs)} replicates × 6 dev sets (K = 4); student − anchor on the test split")
        print(f"{'criterion':40s} {'kept steps':24s} {'Δacc pp':14s} {'ΔG':16s} {'below anchor':13s} − v13, pp")
        table = {}
        for name in criteria(runs[0]["curve"]):
            steps, dacc, dg = [], [], []
            for r in runs:
                i = criteria(r["curve"])[name]
                c, c0 = r["curve"][i], r["curve"][0]
                steps.append(c["step"])
                dacc += [100 * (a - b) for a, b in zip(c["dev_acc"], c0["dev_acc"])]
                dg += [a - b for a, b in zip(c["dev_G"], c0["dev_G"])]
            table[name] = steps, dacc, dg
        reference = table["loss, trained rows (v13)"][1]  # the default criterion, paired set by set
        for name, (steps, dacc, dg) in table.items():
            m, h = report.mean_ci(dacc)
            g, gh = report.mean_ci(dg)
            d, dh = report.mean_ci([a - b for a, b in zip(dacc, reference)])
            below = f"{sum(x < -1e-9 for x in dacc)}/{len(dacc)}"
            print(f"{name:40s} {str(steps):24s} {m:+.2f} ± {h:.2f}   {g:+.3f} ± {gh:.3f}   {below:13s} "
                  f"{d:+.2f} ± {dh:.2f}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pool", default="mlp_scratch", choices=["mlp_scratch", "mlp_finetune"])
    p.add_argument("--replicate", type=int, default=0, help="which 16 training teachers (0–13)")
    p.add_argument("--gen_steps", type=int, default=3000)
    p.add_argument("--eval_every", type=int, default=250)
    p.add_argument("--val_data_fraction", type=float, default=0.2)
    p.add_argument("--alpha", type=float, default=0.3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--analyse", action="store_true", help="print the criteria table from the recorded runs")
    args = p.parse_args(argv)
    if args.analyse:
        return analyse()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    plan = next(x for x in plans.full_plans() if x.name == args.pool)
    with no_progress_bars():
        teachers, data, _, base = plans.load(plan)
    run = methods.PoolRun(plan, teachers, data, base, argparse.Namespace(temperature=4.0, alpha=0.9, seed=args.seed))
    first = 16 * args.replicate
    train_ids, sel_ids = list(range(first, first + 12)), list(range(first + 12, first + 16))
    dev_sets = validation_sets(plan, 24, 4)
    assert max(sel_ids) < min(min(s) for s in dev_sets), "selection teachers overlap the dev sets"
    episodes = EpisodeConfig(2, 6, args.alpha, 4.0, args.seed)
    recipe = methods.GeneratorRecipe(
        max_train_steps=args.gen_steps, num_warmup_steps=max(1, args.gen_steps // 20), batch_size=4096,
        episodes=episodes, val_data_fraction=args.val_data_fraction,
    )  # fmt: skip
    trained_rows, heldout_rows = methods.meta_rows(data, args.val_data_fraction)
    sel_sets = training.validation_sets(list(range(4)), (2, 4))
    sel = teachers.subset(sel_ids)

    def scorers(rows):  # one per set, so the rules below can see how the sets disagree
        rows = torch.tensor(rows)
        logits = run.meta_logits[sel_ids][:, rows]
        return [
            training.ValidationTeachers(sel, [one], data.meta_x[rows], data.meta_y[rows], logits, episodes)
            for one in sel_sets
        ]

    def scores(per_set):
        return {"loss": sum(x["loss"] for x in per_set) / len(per_set),
                "accuracy": sum(x["accuracy"] for x in per_set) / len(per_set)}  # fmt: skip

    heldout, trained = scorers(heldout_rows), scorers(trained_rows[:2000])
    anchors_acc = [run.row(4, i, "anchor", run.test_probs[m[0]], m, 0.0) for i, m in enumerate(dev_sets)]
    curve = []

    def evaluate(generator, step):
        rows = [
            run.row(4, i, "wf", run.test_probs_of(run.prepare(generator.generate_student(teachers.subset(m)))), m, 0.0)
            for i, m in enumerate(dev_sets)
        ]
        heldout_sets, trained_sets = [v.scores(generator) for v in heldout], [v.scores(generator) for v in trained]
        point = {
            "step": step,
            "heldout": scores(heldout_sets),
            "trained": scores(trained_sets),
            "heldout_sets": [[x["loss"], x["accuracy"]] for x in heldout_sets],
            "trained_sets": [[x["loss"], x["accuracy"]] for x in trained_sets],
            "dev_acc": [r["accuracy"] for r in rows],
            "dev_G": [r["gain_recovered"] for r in rows],
        }
        curve.append(point)
        print(
            f"[{time.perf_counter() - t0:5.0f}s] step {step}: selection held-out loss {point['heldout']['loss']:.4f} "
            f"acc {point['heldout']['accuracy']:.4f}; trained-rows loss {point['trained']['loss']:.4f}; dev acc "
            f"{100 * sum(point['dev_acc']) / 6:.2f} (anchors {100 * sum(r['accuracy'] for r in anchors_acc) / 6:.2f})",
            flush=True,
        )

    evaluate(methods.wf.WeightFormerModel.for_teachers(teachers.subset(train_ids), **recipe.config), 0)
    # the validation sets only make methods.train keep the held-out rows out of its batches; its own choice
    # (the v13c loss) is ignored: every criterion reads `curve`
    sel_pairs = [([sel_ids[j] for j in m], a) for m, a in sel_sets]
    methods.train(
        plan, teachers, train_ids, data, run.meta_logits, recipe, log=lambda *_: None,
        on_eval=(args.eval_every, evaluate), validation_sets=sel_pairs,
    )  # fmt: skip
    record = {
        "pool": args.pool,
        "replicate": args.replicate,
        "train_ids": train_ids,
        "selection_ids": sel_ids,
        "dev_sets": dev_sets,
        "steps": args.gen_steps,
        "val_data_fraction": args.val_data_fraction,
        "alpha": args.alpha,
        "seed": args.seed,
        "curve": curve,
        "wall_seconds": time.perf_counter() - t0,
    }
    RUNS.parent.mkdir(parents=True, exist_ok=True)
    with open(RUNS, "a") as f:
        f.write(json.dumps(record) + "\n")
    print(f"done in {record['wall_seconds']:.0f}s")


if __name__ == "__main__":
    main()
