"""Generator design experiments on a *validation* split of a benchmark pool's training teachers.

The benchmark pool's last `--num_val_teachers` training teachers form disjoint validation sets; the generator
trains on (up to `--num_train_teachers` of) the rest with the library's loop (`training.train_generator`, as
`examples/train.py`). The benchmark's own held-out teachers are never loaded as sets here, so design choices
made on these runs stay out of the benchmark's test numbers. Every run appends one JSON line to
`docs/experiments/runs.jsonl` and prints its held-out curve.

    OMP_NUM_THREADS=1 python examples/experiments/generator_design.py --pool mlp_scratch --gen_steps 1500 --tag x
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarking import methods, plans, report  # noqa: E402
from validation import validation_sets, with_fresh_meta  # noqa: E402
from weightformer_hf.modeling.modeling_weightformer import block_memory  # noqa: E402

from weightformer_hf.hub import no_progress_bars  # noqa: E402
from weightformer_hf.training import EpisodeConfig  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pool", default="mlp_scratch", choices=["mlp_scratch", "mlp_finetune"])
    p.add_argument("--num_val_teachers", type=int, default=24)
    p.add_argument("--num_train_teachers", type=int, help="default: every training teacher left")
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--gen_steps", type=int, default=1500)
    p.add_argument("--eval_every", type=int, default=500)
    p.add_argument("--generator_config", default="{}", help="JSON: WeightFormerConfig kwargs over the default")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--accumulation", type=int, default=1, help="episodes (teacher sets) per optimizer step")
    p.add_argument("--batch_size", type=int, default=4096, help="meta-split examples per episode (as the benchmark)")
    p.add_argument("--k_min", type=int, default=2)
    p.add_argument("--k_max", type=int, default=6)
    p.add_argument("--alpha", type=float, default=0.3, help="KD weight; 1 - alpha weighs CE on the meta labels")
    p.add_argument("--temperature", type=float, default=4.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--rescale",
        type=float,
        default=0.0,
        help="function-preserving augmentation: every episode rescales each hidden ReLU unit of each "
        "teacher (incoming row ×a, outgoing column ×1/a, log a ~ U[-s, s]); 0 = off",
    )
    p.add_argument(
        "--permute",
        action="store_true",
        help="function-preserving augmentation: every episode puts its anchor's hidden units in a fresh random "
        "order, and the others, aligned to it, follow (their alignments composed with it, no new weight "
        "matching): the same episode, in a column order the generator has not seen",
    )
    p.add_argument(
        "--meta_samples",
        type=int,
        default=0,
        help="distil on a fresh MNIST-1D draw of this many samples (seed 4242) instead of the 10,000 "
        "of the meta split; best-val anchors stay chosen on the 10,000; 0 = the meta split",
    )
    p.add_argument(
        "--augment",
        action="store_true",
        help="online augmentation of every meta batch (`TeacherTargets(augment=True)`, as "
        "`examples/train.py --online_augmentation`): the teachers run live on the augmented inputs",
    )
    p.add_argument(
        "--coupled",
        action="store_true",
        help="layer coupling: each unit's query also gets the previous layer's final unit states, "
        "summed through the anchor's incoming weights of the unit (MLPs: weight (C, C_prev))",
    )
    p.add_argument(
        "--bilinear_rank",
        type=int,
        default=0,
        help="unit-state decoding: a weight that reads a permuted group (an MLP's hidden units) also changes by "
        "a(q_r) b(p_c)^T of this rank, p_c the generator's state of input unit c; 0 = off",
    )
    p.add_argument(
        "--interpolate",
        action="store_true",
        help="per-unit, per-tensor coefficients on the anchor's row and on (others' aligned mean - anchor)",
    )
    p.add_argument(
        "--mix_teachers",
        action="store_true",
        help="per unit and tensor, a gated softmax over the teachers (scored from the unit's state and each "
        "teacher's aligned token) mixes their aligned rows: a learned, per-unit soup on top of the changes",
    )
    p.add_argument(
        "--unit_messages",
        action="store_true",
        help="with --bilinear_rank: each unit's query also gets sum_c W_anchor[r, c] p_c / sqrt(C_in)",
    )
    p.add_argument(
        "--anchor_only",
        action="store_true",
        help="diagnostic: the generator reads the anchor alone (training and evaluation); the loss still "
        "distils towards the whole set's ensemble. What it gains without reading the other teachers",
    )
    p.add_argument(
        "--train_anchor",
        choices=["random", "best_val"],
        default="random",
        help="the anchor of each training episode: a random member (default) or the member with the best "
        "meta-split accuracy, the anchor a user with validation data passes",
    )
    p.add_argument(
        "--probe_bilinear",
        type=int,
        default=0,
        help="data-aware equivariant decoding of this rank: a weight that reads hidden units changes by "
        "a(q_r) · U h_c, h_c the anchor's activations of input unit c on `--probes` fixed meta inputs (a "
        "unit descriptor whose axes mean the same in every anchor), U learned; every row's query also gets "
        "its own unit's activations (the classifier's rows: its logits and the set's ensemble − anchor "
        "probabilities) on the probes; 0 = off",
    )
    p.add_argument("--probes", type=int, default=512, help="meta inputs read by --probe_bilinear")
    p.add_argument(
        "--probe_parts",
        choices=["both", "decoding", "messages"],
        default="both",
        help="ablation of --probe_bilinear: only the bilinear change (`decoding`) or only the rows' messages",
    )
    p.add_argument(
        "--grad_step",
        action="store_true",
        help="with --probe_bilinear: each row of every tensor also moves along the anchor's gradient of the "
        "training objective on the probes (each tensor's gradient over its RMS), by a step the generator "
        "predicts per row and tensor from the row's state (zero-initialised): a learned, preconditioned step",
    )
    p.add_argument(
        "--canonical",
        choices=["none", "teacher", "mean"],
        default="none",
        help="put every teacher of the pool in one shared unit order before training (function-preserving): "
        "weight matching to the first training teacher (`teacher`), or to the aligned mean of the training "
        "teachers, re-estimated `--canonical_rounds` times (`mean`). Hidden columns then mean loosely the "
        "same in every anchor (docs/experiments.md v17), as they do on fine-tunes",
    )
    p.add_argument("--canonical_rounds", type=int, default=3)
    p.add_argument(
        "--ema",
        type=float,
        default=0.0,
        help="score an exponential moving average of the generator's weights with this decay (updated after "
        "every optimizer step, started at the initial weights) instead of the last weights; 0 = off",
    )
    p.add_argument(
        "--fit_sets",
        type=int,
        default=0,
        metavar="N",
        help="capacity diagnostic: train on the first N disjoint sets of --k training teachers only (episodes of "
        "exactly those sets, every member as anchor) and score those same sets, next to KD from each anchor on the "
        "same objective (1,000 and 3,000 steps at batch 256, and --gen_steps at the generator's batch and schedule "
        "lr): can the generator write a set's student as well as KD when it never has to generalise?",
    )
    p.add_argument(
        "--fixed_sets",
        action="store_true",
        help="train on fixed disjoint sets of --k training teachers, each anchored on its first member (episodes "
        "draw one of them, the others in a random order); scored on the validation sets as usual: the control "
        "for --kd_target_weight",
    )
    p.add_argument(
        "--kd_target_weight",
        type=float,
        default=0.0,
        help="with --fixed_sets: add this weight times a weight-space loss, each tensor's squared distance of the "
        "generated change (student − anchor) from the change 1,000 KD steps make from that anchor on that set "
        "(kd_anchor_1k's recipe), over the KD change's squared norm, averaged over tensors: a dense target for "
        "what the generator should write; 0 = off",
    )
    p.add_argument(
        "--kd_reference",
        nargs="*",
        choices=["kd_1k", "kd_3k", "kd_gen_schedule"],
        default=["kd_1k", "kd_3k", "kd_gen_schedule"],
        help="with --fit_sets: which KD references to run",
    )
    p.add_argument("--save_generator", metavar="DIR", help="also save the trained generator here (save_pretrained)")
    p.add_argument("--tag", required=True)
    p.add_argument("--no_record", action="store_true")
    args = p.parse_args(argv)
    if args.fit_sets and args.fixed_sets:  # before the pool is loaded
        raise SystemExit("--fit_sets and --fixed_sets choose the training episodes two ways; pass one")
    if args.kd_target_weight and not args.fixed_sets:
        raise SystemExit("--kd_target_weight needs --fixed_sets: the KD changes are computed for those sets only")
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    plan = next(x for x in plans.full_plans() if x.name == args.pool)
    with no_progress_bars():
        teachers, data, manifest, base = plans.load(plan)
    bench = argparse.Namespace(temperature=4.0, alpha=0.9, seed=args.seed)
    run = methods.PoolRun(plan, teachers, data, base, bench)
    if args.meta_samples:
        data = with_fresh_meta(data, args.meta_samples)
        run.meta_logits = methods.stacked_logits(teachers, data.meta_x)
    train_ids = list(range(plan.num_train - args.num_val_teachers))[: args.num_train_teachers]
    sets = validation_sets(plan, args.num_val_teachers, args.k)
    if args.fit_sets:
        sets = [train_ids[i * args.k : (i + 1) * args.k] for i in range(args.fit_sets)]
        train_ids = [t for members in sets for t in members]
        args.k_min = args.k_max = args.k
        _episodes_from_fixed_sets(sets)
    if args.fixed_sets:
        fixed = [train_ids[i * args.k : (i + 1) * args.k] for i in range(len(train_ids) // args.k)]
        train_ids = [t for members in fixed for t in members]
        args.k_min = args.k_max = args.k
        _episodes_from_fixed_sets(fixed, anchor_first=True)
        if args.kd_target_weight:
            _weight_space_target(_kd_changes(run, data, fixed, args), args.kd_target_weight)
    recipe = methods.GeneratorRecipe(
        max_train_steps=args.gen_steps,
        learning_rate=args.lr,
        num_warmup_steps=max(1, args.gen_steps // 20),
        gradient_accumulation_steps=args.accumulation,
        batch_size=args.batch_size,
        episodes=EpisodeConfig(args.k_min, args.k_max, args.alpha, args.temperature, args.seed),
    )
    recipe.config.update(json.loads(args.generator_config))
    ema = _average_generator_weights(args.ema) if args.ema else None
    if args.canonical != "none":
        _canonicalise(teachers, train_ids, args.canonical, args.canonical_rounds)
    if args.rescale:
        _augment_episodes_by_rescaling(teachers, args.rescale, args.seed)
    if args.permute:
        _augment_episodes_by_permuting(teachers, args.seed)
    if args.augment:
        from weightformer_hf import training

        training.TeacherTargets = functools.partial(training.TeacherTargets, augment=True)
    if args.anchor_only:
        _generator_reads_anchor_only()
    if args.train_anchor == "best_val":
        _episodes_anchor_on_best_val([run.meta_accuracy[t].item() for t in train_ids])
    if args.coupled:
        methods.wf = _with_generator(methods.wf, _coupled_generator())
    if args.bilinear_rank or args.interpolate or args.mix_teachers:
        cls = _unit_state_generator(args.bilinear_rank, args.interpolate, args.unit_messages, args.mix_teachers)
        methods.wf = _with_generator(methods.wf, cls)
    if args.probe_bilinear:
        probes = (data.meta_x[: args.probes], data.meta_y[: args.probes])
        cls = _probe_bilinear_generator(
            args.probe_bilinear, probes[0], args.temperature, args.grad_step, probes[1], args.alpha, args.probe_parts
        )
        methods.wf = _with_generator(methods.wf, cls)
    anchors = [run.row(args.k, i, "anchor", run.test_probs[m[0]], m, 0.0)["gain_recovered"] for i, m in enumerate(sets)]
    curve = []

    # the anchor a user with validation data would pick: the set's best teacher on the meta split
    best = [max(range(args.k), key=lambda j, m=m: run.meta_accuracy[m[j]].item()) for m in sets]
    best_val = [
        run.row(args.k, i, "best", run.test_probs[m[b]], m, 0.0)["gain_recovered"]
        for i, (m, b) in enumerate(zip(sets, best))
    ]

    def evaluate(generator, step):
        if ema is not None:
            with ema.swapped_in(generator):
                return _evaluate(generator, step)
        return _evaluate(generator, step)

    def _evaluate(generator, step):
        g, g_best = [], []
        for i, (members, b) in enumerate(zip(sets, best)):
            for anchor, out in ((0, g), (b, g_best)):
                if args.anchor_only:
                    student = run.prepare(generator.generate_student(teachers.subset([members[anchor]])))
                else:
                    student = run.prepare(generator.generate_student(teachers.subset(members), anchor=anchor))
                out.append(run.row(args.k, i, "wf", run.test_probs_of(student), members, 0.0)["gain_recovered"])
        paired = report.mean_ci([a - b for a, b in zip(g, anchors)])
        paired_best = report.mean_ci([a - b for a, b in zip(g_best, best_val)])
        curve.append(
            {
                "step": step,
                "G": report.mean_ci(g),
                "paired_gain": paired,
                "per_set": g,
                "G_best_anchor": report.mean_ci(g_best),
                "paired_gain_best_anchor": paired_best,
            }
        )
        print(
            f"[{time.perf_counter() - t0:6.0f}s] step {step}: val G {curve[-1]['G'][0]:.3f} ± {curve[-1]['G'][1]:.3f}"
            f", paired gain {paired[0]:+.3f} ± {paired[1]:.3f}; best-val anchor: G "
            f"{curve[-1]['G_best_anchor'][0]:.3f}, gain over that anchor {paired_best[0]:+.3f} ± "
            f"{paired_best[1]:.3f}",
            flush=True,
        )

    kd_reference = _kd_on_fixed_sets(run, data, sets, args) if args.fit_sets else None
    generator, stats = methods.train(
        plan, teachers, train_ids, data, run.meta_logits, recipe, on_eval=(args.eval_every, evaluate)
    )
    if not curve or curve[-1]["step"] != args.gen_steps:
        evaluate(generator, args.gen_steps)
    if args.save_generator:
        generator.save_pretrained(args.save_generator)
    record = {
        "tag": args.tag,
        "pool": args.pool,
        "num_train_teachers": len(train_ids),
        "val_sets": sets,
        "k": args.k,
        "steps": args.gen_steps,
        "lr": args.lr,
        "accumulation": args.accumulation,
        "batch_size": args.batch_size,
        "alpha": args.alpha,
        "temperature": args.temperature,
        "rescale": args.rescale,
        "permute": args.permute,
        "augment": args.augment,
        "coupled": args.coupled,
        "bilinear_rank": args.bilinear_rank,
        "interpolate": args.interpolate,
        "unit_messages": args.unit_messages,
        "mix_teachers": args.mix_teachers,
        "anchor_only": args.anchor_only,
        "probe_bilinear": args.probe_bilinear,
        "probes": args.probes if args.probe_bilinear else 0,
        "grad_step": args.grad_step,
        "probe_parts": args.probe_parts,
        "train_anchor": args.train_anchor,
        "canonical": args.canonical,
        "ema": args.ema,
        "canonical_rounds": args.canonical_rounds if args.canonical == "mean" else 0,
        "meta_samples": args.meta_samples or len(data.meta_x),
        "fit_sets": args.fit_sets,
        "fixed_sets": args.fixed_sets,
        "kd_target_weight": args.kd_target_weight,
        "kd_reference": kd_reference,
        "config": recipe.config,
        "anchor_G": report.mean_ci(anchors),
        "best_val_G": report.mean_ci(best_val),
        "final": curve[-1],
        "curve": curve,
        "wall_seconds": time.perf_counter() - t0,
    }
    print(
        json.dumps(
            {k: record[k] for k in ("tag", "num_train_teachers", "anchor_G", "best_val_G", "final", "wall_seconds")}
        )
    )
    if not args.no_record:
        with open(REPO / "docs" / "experiments" / "runs.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")


def _augment_episodes_by_rescaling(teachers, scale: float, seed: int) -> None:
    """Wrap `training.episode_loss` so every episode sees its teachers rescaled unit by unit: for a ReLU MLP
    (no norms) the same functions in other weights, which weight matching does not undo."""
    from weightformer_hf import training

    if teachers.arch.get("config", {}).get("model_type") != "wf_mlp":
        raise SystemExit("--rescale is exact only for the ReLU MLPs of the MNIST-1D pools")
    spec = teachers.family.permutation_spec(teachers.template)
    rng = torch.Generator().manual_seed(seed + 12345)
    original = training.episode_loss

    def rescaled(state):
        new = {k: state[k].clone() for k in teachers.shapes}
        sizes = {groups[0]: new[name].shape[0] for name, (groups, _) in spec.items() if groups[0] is not None}
        factor = {g: torch.empty(n).uniform_(-scale, scale, generator=rng).exp() for g, n in sizes.items()}
        for name, (groups, _) in spec.items():
            if groups[0] is not None:  # this unit's incoming weights and bias
                new[name] *= factor[groups[0]].reshape(-1, *[1] * (new[name].dim() - 1))
            if len(groups) > 1 and groups[1] is not None:  # the next layer's weights that read it
                new[name] /= factor[groups[1]]
        return new

    def episode_loss(generator, pool, episode, *rest, **kwargs):
        members, anchor = episode
        subset = pool.subset(members)
        subset.state_dicts = [rescaled(sd) for sd in subset.state_dicts]
        return original(generator, subset, (list(range(len(members))), anchor), *rest, **kwargs)

    training.episode_loss = episode_loss


def _augment_episodes_by_permuting(teachers, seed: int) -> None:
    """Wrap `training.episode_loss` so every episode's anchor has its hidden units in a fresh random order P
    (every permuted group), which keeps its function. Each other member's alignment to it is its alignment
    to the original anchor composed with P (`permute_tensor` gathers, so `π[P]`), put in the episode's own
    alignment cache: no weight matching runs, and the episode is the original one in another column order."""
    import dataclasses
    import itertools

    from weightformer_hf import training
    from weightformer_hf.alignment import permute_tensor

    spec = teachers.family.permutation_spec(teachers.template)
    rng = torch.Generator().manual_seed(seed + 54321)
    original, episodes = training.episode_loss, itertools.count()

    def episode_loss(generator, pool, episode, *rest, **kwargs):
        members, anchor = episode
        subset = pool.subset(members)
        module = getattr(generator, "module", generator)
        aligned = module._alignments(subset, anchor)  # to the original anchor: cached after the first episode
        state = subset.state_dicts[anchor]
        order = {g: torch.randperm(len(p), generator=rng) for g, p in next(a for a in aligned if a).items()}
        subset.state_dicts = list(subset.state_dicts)
        subset.state_dicts[anchor] = {n: permute_tensor(n, t, spec, order) for n, t in state.items()}
        info = subset.infos[anchor]
        subset.infos = list(subset.infos)
        subset.infos[anchor] = dataclasses.replace(
            info, repo_id=None, revision=None, content_hash=f"{info.identity}#permuted-{next(episodes)}", extra={}
        )
        subset.alignment_cache = {}
        key = (subset.infos[anchor].identity, module.config.align_max_iter, 0, 1e-3)  # align_to_anchor's defaults
        for k in range(len(members)):
            if k != anchor:
                composed = {g: p[order[g]] for g, p in aligned[k].items()}
                subset.alignment_cache[(key[0], subset.infos[k].identity, *key[1:])] = composed
        return original(generator, subset, (list(range(len(members))), anchor), *rest, **kwargs)

    training.episode_loss = episode_loss


class _WeightAverage:
    """An exponential moving average of a module's parameters, kept beside them."""

    def __init__(self, decay: float):
        self.decay, self.params, self.average = decay, [], []

    def track(self, module) -> None:
        self.params = list(module.parameters())
        self.average = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        torch._foreach_lerp_(self.average, [p.detach() for p in self.params], 1.0 - self.decay)

    @contextlib.contextmanager
    def swapped_in(self, module):
        """Context: `module`'s parameters hold the average, and their own values again on exit."""
        if [id(p) for p in module.parameters()] != [id(p) for p in self.params]:
            raise RuntimeError("the weight average tracks another module")
        own = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            torch._foreach_copy_(self.params, self.average)
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_(self.params, own)


def _average_generator_weights(decay: float) -> _WeightAverage:
    """Wrap `training.optimizer_and_scheduler` so the generator it is built for gets a `_WeightAverage`,
    updated after each optimizer step."""
    from weightformer_hf import training

    average, original = _WeightAverage(decay), training.optimizer_and_scheduler

    def optimizer_and_scheduler(generator, *args, **kwargs):
        optimizer, scheduler = original(generator, *args, **kwargs)
        average.track(generator)
        step = optimizer.step

        def step_and_average(*a, **k):
            out = step(*a, **k)
            average.update()
            return out

        optimizer.step = step_and_average
        return optimizer, scheduler

    training.optimizer_and_scheduler = optimizer_and_scheduler
    return average


def _canonicalise(teachers, reference_ids: list[int], mode: str, rounds: int) -> None:
    """Permute every teacher of `teachers` in place into one unit order shared by the whole pool.

    `teacher`: the order of `reference_ids[0]`. `mean`: the aligned mean of the `reference_ids` teachers,
    re-estimated `rounds` times (each round matches every reference teacher to the current mean, the
    first round's mean being the first teacher). Only the reference teachers define the order; every
    teacher is then matched to it. Permutations preserve each teacher's function exactly."""
    from weightformer_hf.alignment import permute_tensor, weight_matching

    spec = teachers.family.permutation_spec(teachers.template)
    names = list(teachers.shapes)
    original = [{n: sd[n].float() for n in names} for sd in teachers.state_dicts]

    def matched(reference, i):
        perms = weight_matching(spec, reference, original[i])
        return {n: permute_tensor(n, original[i][n], spec, perms) for n in names}

    reference = original[reference_ids[0]]
    for _ in range(rounds if mode == "mean" else 0):
        aligned = [matched(reference, i) for i in reference_ids]
        reference = {n: torch.stack([a[n] for a in aligned]).mean(0) for n in names}
    t0 = time.perf_counter()
    for i in range(len(teachers.state_dicts)):
        dtype = {n: teachers.state_dicts[i][n].dtype for n in names}
        teachers.state_dicts[i] = {n: t.to(dtype[n]) for n, t in matched(reference, i).items()}
    teachers.alignment_cache.clear()
    print(f"canonical unit order ({mode}): {len(teachers.state_dicts)} teachers in {time.perf_counter() - t0:.0f} s")


def _episodes_from_fixed_sets(sets: list[list[int]], anchor_first: bool = False) -> None:
    """Every training episode is one of `sets` (as positions in the training pool, which holds exactly their
    teachers), in a random order, with a random member as anchor (`anchor_first`: the set's first member)."""
    from weightformer_hf import training

    positions = [[i * len(sets[0]) + j for j in range(len(members))] for i, members in enumerate(sets)]

    def sample_episode(rng, pool_size, k_min, k_max):
        chosen = list(positions[rng.randrange(len(positions))])
        rng.shuffle(chosen)
        return chosen, chosen.index(min(chosen)) if anchor_first else rng.randrange(len(chosen))

    training.sample_episode = sample_episode


def _kd_changes(run, data, sets: list[list[int]], args) -> dict[int, dict[str, torch.Tensor]]:
    """For each set (keyed by its first member's position in the training pool), the change of every float
    tensor that `kd_anchor_1k`'s 1,000 KD steps make from that first member, cached on disk by the sets."""
    import copy
    import hashlib

    from safetensors.torch import load_file, save_file

    from weightformer_hf import baselines

    key = hashlib.sha256(json.dumps([sets, args.alpha, args.temperature, args.seed]).encode()).hexdigest()[:12]
    from weightformer_hf.cache_dirs import cache_root

    path = cache_root() / "experiments" / f"kd_changes_{args.pool}_{key}.safetensors"
    if path.exists():
        changes = {}
        for key, tensor in load_file(path).items():  # "position/tensor name"
            position, name = key.split("/", 1)
            changes.setdefault(int(position), {})[name] = tensor
        return changes
    changes, start = {}, time.perf_counter()
    for i, members in enumerate(sets):
        anchor = run.teachers.model(members[0])
        before = {n: t.detach().clone() for n, t in anchor.state_dict().items() if t.is_floating_point()}
        model = baselines.kd_anchor(copy.deepcopy(anchor), data.meta_x, data.meta_y, run.meta_logits[members],
                                    steps=1000, temperature=args.temperature, alpha=args.alpha,
                                    seed=args.seed)  # fmt: skip
        changes[i * len(members)] = {n: model.state_dict()[n] - before[n] for n in before}
        if i % 10 == 0:
            print(f"KD changes: {i + 1}/{len(sets)} sets ({time.perf_counter() - start:.0f}s)", flush=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({f"{i}/{n}": t.contiguous() for i, state in changes.items() for n, t in state.items()}, path)
    return changes


def _weight_space_target(changes: dict[int, dict[str, torch.Tensor]], weight: float) -> None:
    """Wrap `training.episode_loss`: the functional loss plus `weight` × the mean over tensors of
    ‖generated change − KD change‖² / ‖KD change‖², for episodes anchored on a set's first member."""
    from weightformer_hf.modeling import run_student

    from weightformer_hf import training

    def episode_loss(generator, pool, episode, inputs, labels, teacher_logits, alpha, temperature):
        members, anchor = episode
        subset = pool.subset(members)
        out = generator(subset, anchor=anchor)
        logits = run_student(subset, out.student_state, inputs)
        loss = training.kd_loss(logits, teacher_logits.to(logits.device), labels, alpha, temperature)
        target, anchor_state = changes[members[anchor]], pool.state_dicts[members[anchor]]
        terms = [
            ((out.student_state[n] - anchor_state[n].float()) - t).pow(2).sum() / t.pow(2).sum().clamp_min(1e-12)
            for n, t in target.items()
        ]
        return loss + weight * torch.stack(terms).mean()

    training.episode_loss = episode_loss


def _kd_on_fixed_sets(run, data, sets: list[list[int]], args) -> dict:
    """G of KD from each set's first member on the generator's objective: 1,000 and 3,000 AdamW steps at batch
    256 (`kd_anchor_1k`'s recipe), and --gen_steps steps at the generator's batch with a warm-up + cosine lr
    peaking at --lr (the free parameterisation the generator stands in for)."""
    import copy

    from weightformer_hf import baselines, training

    out = {}
    for name, steps, batch in (("kd_1k", 1000, 256), ("kd_3k", 3000, 256), ("kd_gen_schedule", args.gen_steps,
                                                                          args.batch_size)):  # fmt: skip
        if name not in args.kd_reference:
            continue
        gains = []
        for i, members in enumerate(sets):
            model = copy.deepcopy(run.teachers.model(members[0]))
            if name == "kd_gen_schedule":
                optimizer, scheduler = training.optimizer_and_scheduler(
                    model, args.lr, 0.01, "cosine", max(1, steps // 20), steps
                )
                targets = training.ensemble_targets(run.meta_logits[members], args.temperature)
                generator = torch.Generator().manual_seed(args.seed)
                model.train()
                for _ in range(steps):
                    index = torch.randint(len(data.meta_x), (batch,), generator=generator)
                    loss = training.distillation_loss(model(data.meta_x[index]).logits, targets[index],
                                                      data.meta_y[index], args.alpha, args.temperature)  # fmt: skip
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    scheduler.step()
                model.eval()
            else:
                baselines.kd_anchor(model, data.meta_x, data.meta_y, run.meta_logits[members], steps=steps,
                                    batch_size=batch, temperature=args.temperature, alpha=args.alpha,
                                    seed=args.seed)  # fmt: skip
            gains.append(run.row(args.k, i, name, run.test_probs_of(model), members, 0.0)["gain_recovered"])
        out[name] = {"G": report.mean_ci(gains), "per_set": gains}
        print(f"{name}: G {out[name]['G'][0]:.3f} per set {[round(g, 3) for g in gains]}", flush=True)
    return out


def _episodes_anchor_on_best_val(accuracy: list[float]) -> None:
    """Wrap `training.sample_episode` so each episode's anchor is its member with the best `accuracy`
    (indexed like the training pool)."""
    from weightformer_hf import training

    original = training.sample_episode

    def sample_episode(rng, pool_size, k_min, k_max):
        members, _ = original(rng, pool_size, k_min, k_max)
        return members, max(range(len(members)), key=lambda j: accuracy[members[j]])

    training.sample_episode = sample_episode


def _generator_reads_anchor_only() -> None:
    """Wrap `training.episode_loss` so the generator reads only the episode's anchor while the loss keeps
    the whole set's teacher logits (the target)."""
    from weightformer_hf.modeling import run_student

    from weightformer_hf import training

    def episode_loss(generator, pool, episode, inputs, labels, teacher_logits, alpha, temperature):
        members, anchor = episode
        alone = pool.subset([members[anchor]])
        logits = run_student(alone, generator(alone, anchor=0).student_state, inputs)
        return training.kd_loss(logits, teacher_logits.to(logits.device), labels, alpha, temperature)

    training.episode_loss = episode_loss


def _with_generator(module, cls):
    """`module` (the `weightformer_hf` namespace `methods.train` builds its generator from) with
    `WeightFormerModel` replaced by `cls`."""
    import types

    namespace = types.SimpleNamespace(**{k: getattr(module, k) for k in dir(module) if not k.startswith("__")})
    namespace.WeightFormerModel = cls
    return namespace


def _generator_pass(model, index, content, anchor, cross, message=None):
    """`WeightFormerModel._generate_layer` up to the decoder, with `message` (C, d) added to every anchor query:
    returns the final queries (n_chunks, C, d), the next [cross] state and the embedded tokens (K, C, n, d)."""
    n_teachers, channels, n_chunks, _ = content.shape
    chunk_ids = torch.arange(n_chunks, device=content.device) + model.chunk_offsets[index]
    tokens = model.embedders[index](content) + model.chunk_embed(chunk_ids)[:, None, :].transpose(0, 1)
    tokens = tokens + model.layer_embed.weight[index]
    roles = torch.zeros(n_teachers, dtype=torch.long, device=tokens.device)
    roles[anchor] = 1
    tokens = tokens + model.role_embed(roles)[:, None, None, :]
    queries = tokens[anchor]
    if model.config.pool_aligned and n_teachers > 1:
        others = torch.cat([tokens[:anchor], tokens[anchor + 1 :]]).mean(0)
        queries = queries + model.pool_proj(others)
    if message is not None:
        queries = queries + message[:, None, :]
    queries = queries.transpose(0, 1)
    memory = block_memory(tokens, model.config.cross_attention)
    if model.config.use_cross_token:
        queries = torch.cat([cross.expand(n_chunks, 1, -1), queries], dim=1)
    for block in model.blocks:
        queries = block(queries, memory)
    queries = model.final_norm(queries)
    if model.config.use_cross_token:
        cross, queries = queries[:, 0].mean(0), queries[:, 1:]
    return queries, cross, tokens


def _coupled_generator():
    """A `WeightFormerModel` whose layer l sees what it decided for layer l - 1: every unit's query gets
    `inflow(W_anchor[r] @ H_prev / sqrt(C_prev))`, H_prev the previous layer's final unit states, W_anchor
    the anchor's normalised incoming weights of unit r. Gradients flow across layers through it."""
    import math

    from torch import nn
    from weightformer_hf.modeling.modeling_weightformer import WeightFormerModel

    class CoupledWeightFormer(WeightFormerModel):
        def __init__(self, config):
            super().__init__(config)
            self.inflow = nn.Linear(config.hidden_size, config.hidden_size)
            nn.init.normal_(self.inflow.weight, std=config.initializer_range)
            nn.init.zeros_(self.inflow.bias)
            self._previous = None

        def forward(self, teachers, anchor=0):
            self._previous = None
            try:
                return super().forward(teachers, anchor)
            finally:
                self._previous = None

        def _generate_layer(self, index, layer, inputs, anchor, cross):  # the base's, plus the inflow
            content = inputs.content
            n_teachers, channels, n_chunks, chunk = content.shape
            width = self.config.student_layers[index]["width"]
            previous, message = self._previous, None
            if previous is not None:
                c_prev = previous.shape[0]
                if width > c_prev:  # weight (C, C_prev) first in the token
                    incoming = content[anchor].reshape(channels, -1)[:, :c_prev]
                    message = self.inflow(incoming @ previous / math.sqrt(c_prev))
            queries, cross, _ = _generator_pass(self, index, content, anchor, cross, message)
            self._previous = queries.mean(0)  # (C, d): this layer's unit states, for the next layer
            decrements = self.decoders[index](queries)
            decrements = decrements.transpose(0, 1).reshape(channels, n_chunks * chunk)[:, :width]
            return decrements, cross

    return CoupledWeightFormer


@functools.cache
def _linked_weightformer():
    """`WeightFormerModel` whose `for_teachers` also calls `model._link(teachers)`, where a variant adds the
    modules that depend on the teachers' layers."""
    from weightformer_hf.modeling.modeling_weightformer import WeightFormerModel

    class LinkedWeightFormer(WeightFormerModel):
        @classmethod
        def for_teachers(cls, teachers, **kwargs):
            model = super().for_teachers(teachers, **kwargs)
            model._link(teachers)
            return model

    return LinkedWeightFormer


def _unit_state_generator(rank: int, interpolate: bool, messages: bool, mix: bool = False):
    """A `WeightFormerModel` whose changes respect the hidden units' arbitrary order.

    The base decoder writes row r's change through a fixed linear map per column, but an MLP's hidden
    columns have no fixed meaning across anchors. Up to three terms are added to each row's decrement (all
    zero-initialised: the untrained generator still returns the anchor):

    - `rank > 0`: for a tensor whose input axis is a permuted group generated earlier (an MLP's previous
      hidden layer), `a(q_r) · b(p_c)` summed over `rank`, with q_r the row's final state and p_c the state
      the generator computed for input unit c (`messages`: the query also gets `sum_c W_a[r, c] p_c`).
    - `interpolate`: per row and tensor, `g1(q_r) · anchor_row + g2(q_r) · (others' aligned mean - anchor_row)`
      in normalised units.
    - `mix`: per row and tensor, `gate(q_r) · sum_k softmax_k(score(q_r, token_k,r)) · (row_k - anchor_row)`.
    """
    import math

    from torch import nn

    class UnitStateWeightFormer(_linked_weightformer()):
        def _link(self, teachers):
            d, std = self.config.hidden_size, self.config.initializer_range
            spec = teachers.family.permutation_spec(teachers.template)
            layers, _ = teachers.layers
            self._out_group, self._segments, self._links = [], [], []
            produced = set()
            self.row_coef = nn.ModuleList()
            self.col_proj, self.inflow = nn.ModuleDict(), nn.ModuleDict()
            for index, layer in enumerate(layers):
                segments, links, start = [], [], 0
                for t in layer.tensors:
                    shape = tuple(teachers.shapes[t.name])
                    width = math.prod(shape) // layer.channels
                    segments.append((start, width))
                    groups, reshape = spec.get(t.name, ((None,), None))
                    dims = reshape or shape
                    if rank and t.channel_axis == 0 and len(groups) > 1 and groups[1] in produced:
                        rest = width // dims[1]
                        key = f"{index}_{len(links)}"
                        links.append((key, start, dims[1], rest, groups[1]))
                        self.col_proj[key] = nn.Linear(d, rank * rest)
                        nn.init.normal_(self.col_proj[key].weight, std=std)
                        nn.init.zeros_(self.col_proj[key].bias)
                        if messages:
                            self.inflow[key] = nn.Linear(d, d)
                            nn.init.normal_(self.inflow[key].weight, std=std)
                            nn.init.zeros_(self.inflow[key].bias)
                    start += width
                first = spec.get(layer.tensors[0].name, ((None,), None))[0][0]
                self._out_group.append(first)
                self._segments.append(segments)
                self._links.append(links)
                n = len(segments)
                width = (rank if links else 0) + (2 * n if interpolate else 0) + (n if mix else 0)
                coef = nn.Linear(d, width) if width else nn.Identity()  # Identity: no coefficients (sliced to 0)
                if width:
                    nn.init.zeros_(coef.weight)
                    nn.init.zeros_(coef.bias)
                self.row_coef.append(coef)
                if first is not None:
                    produced.add(first)
            if mix:
                self.mix_query, self.mix_key = nn.Linear(d, d), nn.Linear(d, d)

        def forward(self, teachers, anchor=0):
            self._states = {}
            try:
                return super().forward(teachers, anchor)
            finally:
                self._states = {}

        def _generate_layer(self, index, layer, inputs, anchor, cross):
            content = inputs.content
            n_teachers, channels, n_chunks, chunk = content.shape
            width = self.config.student_layers[index]["width"]
            flat = content.reshape(n_teachers, channels, n_chunks * chunk)[:, :, :width]
            links = [x for x in self._links[index] if x[4] in self._states]
            message = None
            for key, start, c_in, rest, group in links if messages else ():  # links whose inputs were generated
                incoming = flat[anchor, :, start : start + c_in * rest].reshape(channels, c_in, rest).mean(-1)
                m = self.inflow[key](incoming @ self._states[group] / math.sqrt(c_in))
                message = m if message is None else message + m
            queries, cross, tokens = _generator_pass(self, index, content, anchor, cross, message)
            keys = self.mix_key(tokens.mean(2)) if mix else None  # (K, C, d): each teacher's unit, for the mix
            decrements = self.decoders[index](queries)
            decrements = decrements.transpose(0, 1).reshape(channels, n_chunks * chunk)[:, :width]
            states = queries.mean(0)  # (C, d): this layer's unit states
            if self._out_group[index] is not None:
                self._states[self._out_group[index]] = states
            row_coef = self.row_coef[index]
            coef = row_coef(states) if isinstance(row_coef, nn.Linear) else states[:, :0]
            extra = []
            if rank and self._links[index]:
                a, coef = coef[:, :rank], coef[:, rank:]
                for key, start, c_in, rest, group in links:
                    b = self.col_proj[key](self._states[group]).view(c_in, rank, rest)
                    change = torch.einsum("rm,cmk->rck", a, b).reshape(channels, c_in * rest) / math.sqrt(rank)
                    extra.append((start, change))
            if interpolate:
                others = (flat.sum(0) - flat[anchor]) / max(1, n_teachers - 1)
                for i, (start, w) in enumerate(self._segments[index]):
                    own = flat[anchor, :, start : start + w]
                    mean = others[:, start : start + w] - own if n_teachers > 1 else torch.zeros_like(own)
                    extra.append((start, coef[:, 2 * i, None] * own + coef[:, 2 * i + 1, None] * mean))
                coef = coef[:, 2 * len(self._segments[index]) :]
            if mix:
                gate, coef = coef[:, : len(self._segments[index])], coef[:, len(self._segments[index]) :]
                scores = torch.einsum("cd,kcd->ck", self.mix_query(states), keys) / math.sqrt(keys.shape[-1])
                weights = scores.softmax(-1)  # (C, K): over the teachers, the anchor included
                mixed = torch.einsum("ck,kcw->cw", weights, flat) - flat[anchor]
                for i, (start, w) in enumerate(self._segments[index]):
                    extra.append((start, -gate[:, i, None] * mixed[:, start : start + w]))  # gate 1: the mix
            if extra:
                full = torch.zeros_like(decrements)
                for start, change in extra:
                    full[:, start : start + change.shape[1]] += change
                decrements = decrements + full
            return decrements, cross

    return UnitStateWeightFormer


def _mlp_activations(template, state, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """`(C, P)` per hidden group (post-ReLU outputs of `net.i`, keyed `P_net.i`) and the logits (`"logits"`)
    of the ReLU MLP `template` with weights `state` on inputs `x` `(P, features)`."""
    import torch.nn.functional as F
    from torch import nn

    out, h, last = {}, x, None
    for i, module in enumerate(template.net):
        if isinstance(module, nn.Linear):
            h, last = F.linear(h, state[f"net.{i}.weight"].float(), state[f"net.{i}.bias"].float()), i
        elif isinstance(module, nn.ReLU):
            h = F.relu(h)
            out[f"P_net.{last}"] = h.T
    out["logits"] = h.T
    return out


def _probe_bilinear_generator(
    rank: int,
    probes: torch.Tensor,
    temperature: float,
    grad_step: bool = False,
    probe_labels: torch.Tensor | None = None,
    alpha: float = 0.3,
    parts: str = "both",
):
    """A `WeightFormerModel` whose changes of weights that read hidden units follow what those units compute.

    For every layer, each row's query gets `message(d_r)`, d_r the anchor's outputs of that row's unit on the
    fixed `probes` (over the layer's RMS; the classifier's rows also get the set's ensemble − anchor
    probabilities at `temperature`). A weight `(C, C_in)` that reads a hidden group also changes by
    `a(q_r) · U h_c / sqrt(rank)`, h_c the anchor's activations of input unit c on the probes: the probe axis
    means the same in every anchor, so U can name "units that fire on these inputs" where the decoder's
    fixed per-column maps can only name "column 17". `a` is zero-initialised: the untrained generator still
    returns the anchor. ReLU MLPs (the MNIST-1D pools) only.

    `grad_step`: every row of every tensor also moves by `s(q_r) · g_r`, g the anchor's gradient of the
    training objective (`kd_loss` at `alpha`, `temperature`, on the probes and `probe_labels`) over each
    tensor's RMS, s zero-initialised (one step per row and tensor): a learned, preconditioned gradient step.
    `parts` ("both", "decoding", "messages") keeps one of the two terms only, for ablations.
    """
    import math

    from torch import nn

    n_probes = probes.shape[0]

    class ProbeBilinearWeightFormer(_linked_weightformer()):
        def _link(self, teachers):
            if teachers.arch.get("config", {}).get("model_type") != "wf_mlp":
                raise SystemExit("--probe_bilinear reads the ReLU MLPs of the MNIST-1D pools only")
            d, std = self.config.hidden_size, self.config.initializer_range
            spec = teachers.family.permutation_spec(teachers.template)
            layers, _ = teachers.layers
            self._rows, self._reads = [], []  # per layer: output group (None: logits), (read group, start, c_in)
            self.row_message, self.row_coef, self.col_proj = nn.ModuleList(), nn.ModuleDict(), nn.ModuleDict()
            self.step_size = nn.ModuleDict()
            for index, layer in enumerate(layers):
                groups = spec[layer.tensors[0].name][0]
                self._rows.append(groups[0])
                message = nn.Linear(n_probes * (1 if groups[0] is not None else 2), d)
                nn.init.normal_(message.weight, std=std)
                nn.init.zeros_(message.bias)
                self.row_message.append(message)
                reads = groups[1] if len(groups) > 1 else None
                self._reads.append((reads, 0, teachers.shapes[layer.tensors[0].name][1]) if reads else None)
                if grad_step:
                    self.step_size[str(index)] = nn.Linear(d, len(layer.tensors))
                    nn.init.zeros_(self.step_size[str(index)].weight)
                    nn.init.zeros_(self.step_size[str(index)].bias)
                if reads:
                    self.row_coef[str(index)] = nn.Linear(d, rank)
                    nn.init.zeros_(self.row_coef[str(index)].weight)
                    nn.init.zeros_(self.row_coef[str(index)].bias)
                    self.col_proj[str(index)] = nn.Linear(n_probes, rank, bias=False)
                    nn.init.normal_(self.col_proj[str(index)].weight, std=1 / math.sqrt(n_probes))

        def forward(self, teachers, anchor=0):
            with torch.no_grad():
                acts = [_mlp_activations(teachers.template, sd, probes) for sd in teachers.state_dicts]
                own = acts[anchor]
                self._unit = {g: h / h.pow(2).mean().sqrt().clamp_min(1e-6) for g, h in own.items()}
                probs = torch.stack([a["logits"] / temperature for a in acts]).softmax(dim=1)
                error = probs.mean(0) - probs[anchor]
                self._error = error / error.pow(2).mean().sqrt().clamp_min(1e-6) if len(acts) > 1 else error
            self._grads = self._anchor_gradients(teachers, anchor, acts) if grad_step else {}
            try:
                return super().forward(teachers, anchor)
            finally:
                self._unit, self._error, self._grads = {}, None, {}

        def _anchor_gradients(self, teachers, anchor, acts):
            """Per tensor name, the anchor's gradient of the objective on the probes, over its RMS."""
            from weightformer_hf.training import kd_loss

            state = teachers.state_dicts[anchor]
            params = {n: state[n].detach().float().requires_grad_() for n in teachers.shapes}
            with torch.enable_grad():
                logits = _mlp_activations(teachers.template, params, probes)["logits"].T
                targets = torch.stack([a["logits"].T for a in acts])
                loss = kd_loss(logits, targets, probe_labels, alpha, temperature)
                grads = torch.autograd.grad(loss, list(params.values()))
            return {n: g / g.pow(2).mean().sqrt().clamp_min(1e-12) for n, g in zip(params, grads)}

        def _generate_layer(self, index, layer, inputs, anchor, cross):
            content = inputs.content
            n_teachers, channels, n_chunks, chunk = content.shape
            width = self.config.student_layers[index]["width"]
            group = self._rows[index]
            rows = self._unit[group] if group is not None else torch.cat([self._unit["logits"], self._error], 1)
            message = self.row_message[index](rows) if parts != "decoding" else None
            queries, cross, _ = _generator_pass(self, index, content, anchor, cross, message)
            decrements = self.decoders[index](queries)
            decrements = decrements.transpose(0, 1).reshape(channels, n_chunks * chunk)[:, :width]
            if self._reads[index] is not None and parts != "messages":
                reads, start, c_in = self._reads[index]
                a = self.row_coef[str(index)](queries.mean(0))  # (C, rank)
                columns = self.col_proj[str(index)](self._unit[reads])  # (C_in, rank)
                change = a @ columns.T / math.sqrt(rank)
                pad = (start, width - start - c_in)
                decrements = decrements + torch.nn.functional.pad(change, pad)
            if self._grads:
                steps = self.step_size[str(index)](queries.mean(0))  # (C, tensors of the layer)
                rows = [self._grads[t.name].reshape(channels, -1) for t in layer.tensors]
                widths = [r.shape[1] for r in rows]
                step = torch.cat([steps[:, i, None].expand(-1, w) for i, w in enumerate(widths)], 1)
                decrements = decrements + step * torch.cat(rows, 1)
            return decrements, cross

    return ProbeBilinearWeightFormer


if __name__ == "__main__":
    main()
