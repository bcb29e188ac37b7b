"""The benchmark's methods on one pool: train the generator with the library's own loop, then score every
method on every held-out set.

Each method returns a model (or, for the ensemble, probabilities) built from the set's K teachers and at
most the meta split (validation and distillation data the teachers never saw); the test split only scores.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader

import weightformer_hf as wf
from weightformer_hf import baselines, training
from weightformer_hf.evaluation import agreement, classification_metrics, ensemble_probs, gain_recovered, logits_of
from weightformer_hf.pool import new_teacher
from weightformer_hf.teacher_training import has_batchnorm, train_models

from .plans import LABELS, PoolPlan, Split

METHODS = [
    "single_mean",
    "single_best_val",
    "single_long",
    "ensemble",
    "uniform_soup",
    "greedy_soup",
    "task_arithmetic",
    "ties_merge",
    "aligned_average",
    "kd_anchor_1k",
    "kd_converged",
    "weightformer",
    "weightformer_best_val_anchor",
    "weightformer_in_pool",
    "weightformer_finetuned",
    "weightformer_kd_1k",
]


@dataclass
class GeneratorRecipe:
    """The generator's design (`config`: `WeightFormerConfig` kwargs) and how `training.train_generator`
    trains it: the same loop, episode sampling, loss and schedule as `examples/train.py`."""

    config: dict = field(
        default_factory=lambda: {"hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                                 "intermediate_size": 256, "cross_attention": "aligned"}
    )  # fmt: skip
    max_train_steps: int = 3000
    learning_rate: float = 3e-4
    weight_decay: float = 0.01
    lr_scheduler_type: str = "cosine"
    num_warmup_steps: int = 75
    max_grad_norm: float = 1.0
    batch_size: int = 256
    gradient_accumulation_steps: int = 1  # episodes (teacher sets) per optimizer step
    episodes: training.EpisodeConfig = field(default_factory=training.EpisodeConfig)
    val_data_fraction: float = 0.0  # meta rows kept for validation only (0: validate on the rows it trains on)
    metric_for_best_model: str = "loss"  # the validation score that chooses the step: "loss" or "accuracy"


def training_batch_size(batch_size: int, data: Split, fraction: float = 0.0) -> int:
    """The meta batch an episode really gets: `batch_size`, capped at the meta rows it trains on."""
    return min(batch_size, len(meta_rows(data, fraction)[0]))


def meta_rows(data: Split, val_data_fraction: float) -> tuple[list[int], list[int]]:
    """(rows the generator trains on, rows kept for validation only) of the meta split, a fixed shuffle."""
    return training.validation_rows(len(data.meta_x), val_data_fraction)


def meta_loader(data: Split, batch_size: int, seed: int, shuffle: bool = True, drop_last: bool = True,
                rows: list[int] | None = None) -> DataLoader:  # fmt: skip
    """The meta split (or its `rows`) as the `{"inputs", "labels", "index"}` batches `examples/train.py` reads;
    a batch size above the rows (the 4,096 default on the MNIST-5k pools' 1,000 meta images) is capped at them all."""
    index = torch.arange(len(data.meta_x))
    rows = wf.data.TensorRows({"inputs": data.meta_x, "labels": data.meta_y, "index": index}, rows)
    batch_size = min(batch_size, len(rows))
    return DataLoader(rows, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last, collate_fn=wf.data.collate,
                      generator=torch.Generator().manual_seed(seed))  # fmt: skip


def train(plan: PoolPlan, teachers: wf.TeacherSet, train_ids: list[int], data: Split, meta_logits: torch.Tensor,
          recipe: GeneratorRecipe, log=print, on_eval=None, validation_sets=None, prepare=None):  # fmt: skip
    """`training.train_generator` on the training teachers only. Returns `(generator, stats)`;
    `stats["seen_combinations"]` holds the member sets it trained on (popped before saving).
    `on_eval=(every, fn)` calls `fn(generator, step)` every `every` steps (a held-out curve).
    `validation_sets` (pool indices, anchor position), when given, choose the generator to keep on the meta
    split (or on the `recipe.val_data_fraction` of its rows kept out of the generator's training): the best of
    step 0, every twelfth of the run and the last step, each student scored after
    `prepare(student)` (the BatchNorm re-estimation every generated student gets before it is scored)."""
    torch.manual_seed(recipe.episodes.seed)
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=recipe.gradient_accumulation_steps)
    train_teachers = teachers.subset(train_ids)
    generator = wf.WeightFormerModel.for_teachers(train_teachers, **recipe.config)
    optimizer, scheduler = training.optimizer_and_scheduler(
        generator, recipe.learning_rate, recipe.weight_decay, recipe.lr_scheduler_type, recipe.num_warmup_steps,
        recipe.max_train_steps,
    )  # fmt: skip
    fraction = recipe.val_data_fraction if validation_sets else 0.0
    train_rows, val_rows = meta_rows(data, fraction)
    loader = meta_loader(data, recipe.batch_size, recipe.episodes.seed, rows=train_rows)
    generator, optimizer, loader, scheduler = accelerator.prepare(generator, optimizer, loader, scheduler)
    targets = training.TeacherTargets(train_teachers, meta_logits[train_ids])
    every = max(1, recipe.max_train_steps // 6)
    validation, eval_steps, curve = None, max(1, recipe.max_train_steps // 12), []
    if validation_sets:
        val_ids = sorted({m for members, _ in validation_sets for m in members})
        where = {t: i for i, t in enumerate(val_ids)}
        rows = torch.tensor(val_rows or train_rows)
        validation = training.ValidationTeachers(
            teachers.subset(val_ids), [([where[m] for m in members], a) for members, a in validation_sets],
            data.meta_x[rows], data.meta_y[rows], meta_logits[val_ids][:, rows], recipe.episodes,
            prepare_student=prepare,
        )  # fmt: skip
    if on_eval is not None:
        every = math.gcd(every, on_eval[0])
    start = time.perf_counter()

    def on_log(step: int, loss: float) -> None:
        if step % max(1, recipe.max_train_steps // 6) == 0 or step == recipe.max_train_steps:
            log(f"[{plan.name}] generator step {step}/{recipe.max_train_steps} loss {loss:.4f} "
                f"({time.perf_counter() - start:.0f}s)")  # fmt: skip
        if on_eval is not None and step % on_eval[0] == 0:
            on_eval[1](accelerator.unwrap_model(generator), step)

    def on_validate(step: int, scores: dict, is_best: bool) -> None:
        curve.append((step, scores["loss"], scores["accuracy"]))
        log(f"[{plan.name}] step {step}: validation loss {scores['loss']:.4f}, accuracy {scores['accuracy']:.4f}"
            f"{' (best so far)' if is_best else ''}")  # fmt: skip

    progress = training.TrainingProgress(recipe.metric_for_best_model)
    local = training.train_generator(
        accelerator, generator, optimizer, scheduler, loader, train_teachers, targets, recipe.episodes,
        recipe.max_train_steps, progress, recipe.max_grad_norm, logging_steps=every, show_progress=False,
        on_log=on_log, validation=validation, eval_steps=eval_steps, on_validate=on_validate,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    seen = set()
    for micro in range(recipe.max_train_steps * recipe.gradient_accumulation_steps):  # the episodes drawn (derived)
        rng = training.episode_rng(recipe.episodes.seed, micro, 0)
        members, _ = training.sample_episode(rng, len(train_ids), recipe.episodes.k_min, recipe.episodes.k_max)
        seen.add(frozenset(train_ids[m] for m in members))
    generator = accelerator.unwrap_model(generator).eval()
    return generator, {
        "steps": recipe.max_train_steps,
        "seconds": seconds,
        "seconds_per_step": seconds / max(1, recipe.max_train_steps),
        "final_loss": sum(local[-50:]) / max(1, len(local[-50:])),
        "batch_size": training_batch_size(recipe.batch_size, data, fraction),
        "recipe": {**asdict(recipe)},
        "seen_combinations": seen,
        **({"validation": {"teachers": val_ids, "sets": len(validation_sets), "eval_steps": eval_steps,
                           "rows": len(val_rows) or len(train_rows), "rows_trained_on": not val_rows,
                           "kept_step": progress.best_step, "curve": curve}} if validation else {}),
    }  # fmt: skip


@torch.no_grad()
def stacked_logits(teachers: wf.TeacherSet, x: torch.Tensor) -> torch.Tensor:
    """`(len(teachers), N, C)` fp32 logits of every teacher."""
    return torch.stack([model_logits(teachers.model(i), x) for i in range(len(teachers))])


@torch.no_grad()
def model_logits(model: nn.Module, x: torch.Tensor, batch_size: int = 2048) -> torch.Tensor:
    model.eval()
    return torch.cat([logits_of(model(x[i : i + batch_size])).float() for i in range(0, len(x), batch_size)])


def relative_distance(student: nn.Module, anchor_state) -> float:
    """‖θ_student − θ_anchor‖ / ‖θ_anchor‖ over all floating tensors of the state dict."""
    num = den = 0.0
    for name, value in student.state_dict().items():
        if value.is_floating_point():
            a = anchor_state[name].float()
            num += (value.float() - a).pow(2).sum().item()
            den += a.pow(2).sum().item()
    return math.sqrt(num / max(den, 1e-30))


class PoolRun:
    """Everything one pool's methods share: teachers, cached logits, validation scorer, BatchNorm handling."""

    def __init__(self, plan: PoolPlan, teachers: wf.TeacherSet, data: Split, base: wf.TeacherSet | None, args):
        self.plan, self.teachers, self.data, self.base, self.args = plan, teachers, data, base, args
        start = time.perf_counter()
        self.meta_logits = stacked_logits(teachers, data.meta_x)
        self.logit_seconds = (time.perf_counter() - start) / len(teachers)  # per teacher on the meta split
        self.test_logits = stacked_logits(teachers, data.test_x)
        self.test_probs = F.softmax(self.test_logits, -1)
        self.meta_accuracy = (self.meta_logits.argmax(-1) == data.meta_y).float().mean(1)
        self.bn = has_batchnorm(teachers.model(0))

    def prepare(self, model: nn.Module) -> nn.Module:
        """Models built from merged or generated weights get BatchNorm statistics re-estimated on the meta split."""
        if not self.bn:
            return model.eval()
        batches = [self.data.meta_x[i : i + 256] for i in range(0, min(len(self.data.meta_x), 2048), 256)]
        return training.recompute_bn_stats(model, batches)

    def val_score(self, model: nn.Module) -> float:
        """Validation accuracy on the meta split (what every merge's choices use; never the test split)."""
        return (model_logits(model, self.data.meta_x).argmax(-1) == self.data.meta_y).float().mean().item()

    def test_probs_of(self, model: nn.Module) -> torch.Tensor:
        return F.softmax(model_logits(model, self.data.test_x), -1)

    # ------------------------------------------------------------------------------------------ training
    def recipe_steps_and_lr(self) -> tuple[int, float]:
        """The teachers' budget and peak learning rate (for fine-tune pools: the longest fine-tune, median lr)."""
        spec = self.plan.spec
        if self.plan.finetune:
            return max(spec.finetune_steps), 10 ** (sum(spec.finetune_log10_lr) / 2)
        return spec.train_steps, spec.learning_rate

    def fresh_students(self, n: int, seed: int) -> list[nn.Module]:
        """Starting points of trained-from-data baselines: the base for fine-tune pools, else new inits."""
        if self.base is not None:
            return [copy.deepcopy(self.base.model(0)).train() for _ in range(n)]
        return [new_teacher(self.plan.spec, LABELS, seed=seed + j) for j in range(n)]

    def single_long(self) -> tuple[nn.Module, float, int]:
        steps, lr = self.recipe_steps_and_lr()
        steps = int(self.plan.long_factor * steps)
        model = self.fresh_students(1, 91_000)[0]
        start = time.perf_counter()
        train_models([model], self.data.train_x, self.data.train_y, steps, batch_size=self.plan.spec.batch_size, lr=lr,
                     weight_decay=self.plan.spec.weight_decay, data_seeds=[91_000])  # fmt: skip
        return model, time.perf_counter() - start, steps

    def kd_converged(self, sets: list[list[int]]) -> tuple[list[nn.Module], float, int]:
        """One student per set, distilled on the set's ensemble over train+meta with the teachers' budget and
        recipe, all at once (vmap where possible). Returns the students, seconds per student and steps."""
        steps, lr = self.recipe_steps_and_lr()
        x = torch.cat([self.data.train_x, self.data.meta_x])
        y = torch.cat([self.data.train_y, self.data.meta_y])
        t = self.args.temperature
        logits = torch.cat([stacked_logits(self.teachers, self.data.train_x), self.meta_logits], dim=1)
        targets = torch.stack([training.ensemble_targets(logits[m], t) for m in sets])  # (n, N, C)

        def loss_fn(out, labels, index, rows):
            n, batch, classes = out.shape
            target = targets[rows[:, None], index]
            loss = training.distillation_loss(out.reshape(n * batch, classes), target.reshape(n * batch, classes),
                                              labels.reshape(-1), self.args.alpha, t)  # fmt: skip
            return loss * n  # the sum over models: each model gets the gradient of its own mean loss

        students = self.fresh_students(len(sets), 52_000)
        start = time.perf_counter()
        train_models(students, x, y, steps, batch_size=self.plan.spec.batch_size, lr=lr,
                     weight_decay=self.plan.spec.weight_decay, data_seeds=[53_000 + j for j in range(len(sets))],
                     loss_fn=loss_fn)  # fmt: skip
        return students, (time.perf_counter() - start) / len(sets), steps

    def kd_anchor(self, members: list[int], steps: int, lr: float, model: nn.Module | None = None) -> nn.Module:
        model = model if model is not None else copy.deepcopy(self.teachers.model(members[0]))
        return baselines.kd_anchor(model, self.data.meta_x, self.data.meta_y, self.meta_logits[members], steps=steps,
                                   learning_rate=lr, temperature=self.args.temperature, alpha=self.args.alpha,
                                   seed=self.args.seed)  # fmt: skip

    # ------------------------------------------------------------------------------------------- scoring
    def row(self, k: int, i: int, method: str, probs: torch.Tensor, members: list[int], seconds: float, **extra):
        y = self.data.test_y
        singles = [(self.test_logits[m].argmax(-1) == y).float().mean().item() for m in members]
        single_mean = sum(singles) / len(singles)
        ensemble = classification_metrics(ensemble_probs(list(self.test_logits[members])), y)["accuracy"]
        metrics = classification_metrics(probs, y)
        return {
            "pool": self.plan.name,
            "k": k,
            "heldout_set": i,
            "method": method,
            "members": list(members),
            **metrics,
            "gain_recovered": gain_recovered(metrics["accuracy"], single_mean, ensemble),
            "seconds": seconds,
            **extra,
        }

    def honesty(self, probs: torch.Tensor, members: list[int], model: nn.Module, anchor: int | None = None) -> dict:
        """How far the student moved from its anchor (default: the set's first teacher), and how often it
        agrees with the ensemble."""
        ens = ensemble_probs(list(self.test_logits[members]))
        teachers = [agreement(self.test_probs[m], ens) for m in members]
        return {
            "anchor_distance": relative_distance(model, self.teachers.state_dicts[members[0] if anchor is None
                                                                                  else anchor]),
            "ensemble_agreement": {"student": agreement(probs, ens), "teacher_mean": sum(teachers) / len(teachers),
                                   "teacher_max": max(teachers)},
        }  # fmt: skip


def score_set(run: PoolRun, generator, k: int, i: int, members: list[int], shared: dict) -> list[dict]:
    """Every method on one held-out set (anchor: its first teacher)."""
    args, teachers, rows = run.args, run.teachers, []
    sub = teachers.subset(members)
    per_teacher = shared["seconds_per_teacher"]

    def add(method, model_or_probs, seconds, **extra):
        probs = model_or_probs if isinstance(model_or_probs, torch.Tensor) else run.test_probs_of(model_or_probs)
        rows.append(run.row(k, i, method, probs, members, seconds, **extra))
        return probs

    singles = [run.row(k, i, "single", run.test_probs[m], members, per_teacher) for m in members]
    mean_row = {key: sum(r[key] for r in singles) / k for key in ("accuracy", "nll", "ece")}
    rows.append({**singles[0], **mean_row, "method": "single_mean", "gain_recovered": 0.0,
                 "anchor_gain_recovered": singles[0]["gain_recovered"]})  # fmt: skip
    best = members[int(run.meta_accuracy[members].argmax())]
    add("single_best_val", run.test_probs[best], per_teacher, chosen=best)
    add("single_long", shared["single_long"], shared["single_long_seconds"])
    add("ensemble", ensemble_probs(list(run.test_logits[members])), 0.0)

    start = time.perf_counter()
    add("uniform_soup", run.prepare(baselines.uniform_soup(sub)), time.perf_counter() - start)
    start = time.perf_counter()
    soup, kept = baselines.greedy_soup(sub, run.val_score, prepare=run.prepare)
    add("greedy_soup", soup, time.perf_counter() - start, kept=[members[j] for j in kept])
    if run.base is not None:
        start = time.perf_counter()
        model, lam = baselines.task_arithmetic(sub, run.base, run.val_score, prepare=run.prepare)
        add("task_arithmetic", model, time.perf_counter() - start, chosen={"lambda": lam})
        start = time.perf_counter()
        model, chosen = baselines.ties_merge(sub, run.base, run.val_score, prepare=run.prepare)
        add("ties_merge", model, time.perf_counter() - start, chosen=chosen)
    start = time.perf_counter()
    add("aligned_average", run.prepare(baselines.aligned_average(sub, anchor=0)), time.perf_counter() - start)

    start = time.perf_counter()
    model = run.kd_anchor(members, args.kd_steps, args.kd_lr)
    add("kd_anchor_1k", model, time.perf_counter() - start + k * run.logit_seconds)
    add("kd_converged", shared["kd_converged"][(k, i)], shared["kd_converged_seconds"] + k * run.logit_seconds)

    start = time.perf_counter()
    student = run.prepare(generator.generate_student(sub, anchor=0))
    gen_seconds = time.perf_counter() - start
    start = time.perf_counter()  # again, weight matching now cached: the generator's own cost
    run.prepare(generator.generate_student(sub, anchor=0))
    shared["cached_generation"].setdefault(k, []).append(time.perf_counter() - start)
    probs = run.test_probs_of(student)
    add("weightformer", probs, gen_seconds, **run.honesty(probs, members, student))
    start = time.perf_counter()  # the anchor a user with validation data picks (what single_best_val returns)
    chosen = run.prepare(generator.generate_student(sub, anchor=members.index(best)))
    probs_best = run.test_probs_of(chosen)
    add("weightformer_best_val_anchor", probs_best, time.perf_counter() - start,
        **run.honesty(probs_best, members, chosen, anchor=best))  # fmt: skip
    start = time.perf_counter()
    tuned = run.prepare(run.kd_anchor(members, shared["finetune_steps"], args.finetune_lr, model=student))
    probs = run.test_probs_of(tuned)
    add("weightformer_finetuned", probs, gen_seconds + time.perf_counter() - start + k * run.logit_seconds,
        **run.honesty(probs, members, tuned))  # fmt: skip
    start = time.perf_counter()  # kd_anchor_1k's steps from the generated student (`generate --finetune-steps`)
    distilled = run.kd_anchor(members, args.kd_steps, args.kd_lr, model=generator.generate_student(sub, anchor=0))
    probs = run.test_probs_of(run.prepare(distilled))
    add("weightformer_kd_1k", probs, time.perf_counter() - start + k * run.logit_seconds,
        **run.honesty(probs, members, distilled))  # fmt: skip
    return rows


def score_in_pool(run: PoolRun, generator, k: int, i: int, members: list[int]) -> dict:
    start = time.perf_counter()
    student = run.prepare(generator.generate_student(run.teachers.subset(members), anchor=0))
    seconds = time.perf_counter() - start
    probs = run.test_probs_of(student)
    return run.row(k, i, "weightformer_in_pool", probs, members, seconds, **run.honesty(probs, members, student))


def step_times(run: PoolRun, generator, members: list[int], recipe: GeneratorRecipe, repeats: int = 10) -> dict:
    """Median seconds of one generator training step (`training.episode_loss`, backward, AdamW; alignments
    cached) and of one student-only KD step, both on the training batch (`recipe.batch_size` meta samples, capped
    at the split as `meta_loader` does) with the same K teachers' targets."""
    gen = copy.deepcopy(generator).train()
    opt = torch.optim.AdamW(gen.parameters(), lr=1e-6)
    student = run.teachers.model(members[0]).train()
    s_opt = torch.optim.AdamW(student.parameters(), lr=1e-6)
    e = recipe.episodes
    # the batch the generator trained on: without the meta rows kept for validation, where there were any
    batch_size = training_batch_size(recipe.batch_size, run.data, recipe.val_data_fraction if run.plan.num_val else 0.0)
    g_times, s_times = [], []
    for r in range(repeats + 2):
        batch = torch.randint(len(run.data.meta_x), (batch_size,))
        x, y, logits = run.data.meta_x[batch], run.data.meta_y[batch], run.meta_logits[members][:, batch]
        t = time.perf_counter()
        loss = training.episode_loss(gen, run.teachers, (members, 0), x, y, logits, e.alpha, e.temperature)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        g = time.perf_counter() - t
        t = time.perf_counter()
        loss = training.kd_loss(logits_of(student(x)), logits, y, e.alpha, e.temperature)
        s_opt.zero_grad(set_to_none=True)
        loss.backward()
        s_opt.step()
        s = time.perf_counter() - t
        if r >= 2:  # the first steps warm up allocators and alignments
            g_times.append(g)
            s_times.append(s)
    g_med, s_med = sorted(g_times)[len(g_times) // 2], sorted(s_times)[len(s_times) // 2]
    return {"k": len(members), "batch_size": batch_size, "generator_step_seconds": g_med,
            "student_kd_step_seconds": s_med, "ratio": g_med / s_med}  # fmt: skip
