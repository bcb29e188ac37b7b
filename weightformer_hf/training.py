"""Episodic WeightFormer training and held-out evaluation: the method-specific parts of `examples/train.py`.

One training step (an *episode*): sample K teachers and an anchor from the training teachers, generate the
student, run it on a batch of the meta split, and back-propagate

    alpha · T² · KL(ensemble_T ‖ student_T) + (1 − alpha) · CE(student, labels)

into the generator, where `ensemble_T` is the mean of the K teachers' softmax(logits / T) (the Hinton KD
term; the issue writes it KL(student/T ‖ ensemble/T)). Teacher logits on fixed data never change, so
they are computed once per teacher and split and cached on disk (`TeacherLogitsCache`); a step then costs
one generator pass plus one student forward and backward. Online augmentation would need K live teacher
forwards per step instead (K times the student's cost, plus memory for K teachers on the device).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from .errors import WeightFormerError, first_line
from .evaluation import check_finite_logits, ece, ensemble_probs, gain_recovered, logits_of, nll
from .teachers import TeacherSet


class PoolConfigError(WeightFormerError):
    """Pool sizes and K that cannot work together (K larger than the pool, no teacher left to evaluate)."""


# ------------------------------------------------------------------------------------------ the pool
def split_pool(
    num_teachers: int, num_eval: int, seed: int = 0, purpose: str = "evaluation", flag: str = "--num_eval_teachers"
) -> tuple[list[int], list[int]]:
    """Disjoint (kept, held-out) teacher indices: the held-out teachers are never trained on. `purpose` and
    `flag` name what they are held out for in errors (validation teachers are split off the same way)."""
    if num_teachers == 0:
        raise PoolConfigError("the teacher pool is empty")
    if not 0 < num_eval < num_teachers:
        raise PoolConfigError(
            f"cannot hold out {num_eval} of {num_teachers} teachers for {purpose}: the teachers kept and those "
            f"held out must both be non-empty (set {flag})"
        )
    order = list(range(num_teachers))
    random.Random(f"pool-split-{seed}").shuffle(order)
    return sorted(order[num_eval:]), sorted(order[:num_eval])


def check_k(num_train: int, num_eval: int, k_min: int, k_max: int, eval_k: int, num_val: int = 0) -> None:
    """Raise `PoolConfigError` with the numbers when K does not fit the training or evaluation teachers
    (`num_val`: validation teachers, taken from the training teachers)."""
    if not 1 <= k_min <= k_max:
        raise PoolConfigError(f"need 1 <= k_min <= k_max, got k_min={k_min}, k_max={k_max}")
    if k_max > num_train:
        validating = f", {num_val} kept for validation" if num_val else ""
        raise PoolConfigError(
            f"K is larger than the pool: k_max={k_max} but only {num_train} training teachers "
            f"({num_train + num_eval + num_val} in the pool, {num_eval} held out for evaluation{validating}); "
            "lower --k_max or add teachers"
        )
    if eval_k > num_eval:
        raise PoolConfigError(
            f"K is larger than the pool: evaluation draws sets of {eval_k} teachers but only {num_eval} are "
            "held out; lower --eval_k or raise --num_eval_teachers"
        )


def sample_episode(rng: random.Random, pool_size: int, k_min: int, k_max: int) -> tuple[list[int], int]:
    """K ∈ [k_min, k_max] distinct teacher indices and the anchor's position among them."""
    k = rng.randint(k_min, min(k_max, pool_size))
    return rng.sample(range(pool_size), k), rng.randrange(k)


def episode_rng(seed: int, step: int, rank: int) -> random.Random:
    """The episode RNG of one step on one rank: derived, not stored, so resuming needs no extra state.
    Ranks draw different episodes (more teacher combinations per optimizer step)."""
    return random.Random(f"episode-{seed}-{step}-{rank}")


def heldout_sets(eval_indices: Sequence[int], k: int, num_sets: int, seed: int = 0) -> list[tuple[list[int], int]]:
    """Up to `num_sets` distinct sets of `k` evaluation teachers, each with an anchor position.

    Disjoint sets come first (independent evidence); when the teachers run out, overlapping but distinct sets
    follow; never more than the `comb(len(eval_indices), k)` sets that exist, so a table never repeats a set.
    """
    rng = random.Random(f"heldout-{seed}")
    wanted = min(num_sets, math.comb(len(eval_indices), k))
    order = list(eval_indices)
    rng.shuffle(order)
    members = [sorted(order[i * k : (i + 1) * k]) for i in range(min(wanted, len(order) // k))]
    seen = {tuple(m) for m in members}
    while len(members) < wanted:
        candidate = sorted(rng.sample(list(eval_indices), k))
        if tuple(candidate) not in seen:
            seen.add(tuple(candidate))
            members.append(candidate)
    return [(m, rng.randrange(k)) for m in members]


def validation_sets(
    indices: Sequence[int], ks: Iterable[int], sets_per_k: int = 6, seed: int = 0
) -> list[tuple[list[int], int]]:
    """Sets of validation teachers for `ValidationTeachers`: up to `sets_per_k` distinct sets of each K in
    `ks` that fits (`heldout_sets`), each set once with every member as its anchor, so no one anchor decides."""
    out = []
    for k in sorted(set(ks)):
        if 2 <= k <= len(indices):
            out += [(m, a) for m, _ in heldout_sets(indices, k, sets_per_k, seed=seed + k) for a in range(k)]
    return out


def validation_rows(num_rows: int, fraction: float, seed: int = 4321) -> tuple[list[int], list[int]]:
    """(rows the generator trains on, rows kept to score validation teachers only) of a meta split of
    `num_rows`: a fixed shuffle, `fraction` of it held out, both lists sorted."""
    if not 0.0 <= fraction < 1.0:
        raise PoolConfigError(f"the share of meta rows kept for validation must be in [0, 1), got {fraction}")
    order = torch.randperm(num_rows, generator=torch.Generator().manual_seed(seed)).tolist()
    held = int(fraction * num_rows)
    if fraction and not held:
        raise PoolConfigError(f"keeping {fraction} of {num_rows} meta rows for validation keeps none")
    return sorted(order[held:]), sorted(order[:held])


# ----------------------------------------------------------------------------------- the objective
def ensemble_targets(teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """The ensemble's tempered probabilities, the mean over K of softmax(logits / T): `(K, B, C)` → `(B, C)`."""
    return F.softmax(teacher_logits.float() / temperature, dim=-1).mean(0)


def distillation_loss(
    student_logits: torch.Tensor, targets: torch.Tensor, labels: torch.Tensor, alpha: float, temperature: float
) -> torch.Tensor:
    """`alpha·T²·KL(targets ‖ student_T) + (1−alpha)·CE`, with `targets` from `ensemble_targets`.

    Computed in fp32 whatever the autocast dtype: the KL of nearly equal distributions is a small
    difference of large terms.
    """
    student = student_logits.float()
    kl = F.kl_div(F.log_softmax(student / temperature, dim=-1), targets.float(), reduction="batchmean")
    loss = alpha * temperature**2 * kl
    if alpha < 1:
        loss = loss + (1 - alpha) * F.cross_entropy(student, labels)
    return loss


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    alpha: float,
    temperature: float,
) -> torch.Tensor:
    """`distillation_loss` against the ensemble of `teacher_logits` `(K, B, C)`."""
    return distillation_loss(student_logits, ensemble_targets(teacher_logits, temperature), labels, alpha, temperature)


def episode_loss(
    generator: nn.Module,
    teachers: TeacherSet,
    episode: tuple[list[int], int],
    inputs: torch.Tensor,
    labels: torch.Tensor,
    teacher_logits: torch.Tensor,
    alpha: float,
    temperature: float,
) -> torch.Tensor:
    """The loss of one episode: `episode` = (member indices into `teachers`, anchor position);
    `teacher_logits` `(K, B, C)` are the members' logits on `inputs` (see `TeacherTargets`). The
    generator's own auxiliary loss (shift consistency; off unless its config weighs it) is added."""
    from .modeling import run_student

    members, anchor = episode
    episode_teachers = teachers.subset(members)
    out = generator(episode_teachers, anchor=anchor)
    student_logits = run_student(episode_teachers, out.student_state, inputs)
    loss = kd_loss(student_logits, teacher_logits.to(student_logits.device), labels, alpha, temperature)
    module = getattr(generator, "module", generator)  # under DDP the methods live on the wrapped module
    auxiliary = module.auxiliary_loss(episode_teachers, anchor, out)
    return loss if auxiliary is None else loss + auxiliary


class TeacherTargets:
    """Where an episode's teacher logits come from.

    - cached (default): rows of the on-disk cache, looked up by the batch's `index`; free per step.
    - online augmentation (`augment=True`): the batch is randomly augmented (signals: a circular shift of
      up to 2 samples and 5 % Gaussian noise; images: a horizontal flip and a 4-pixel translation), so the
      K teachers must run live on it. Cost per step: K extra teacher forwards (no backward), about K/3 of
      the student's forward+backward, and every training teacher resident on the device.
    """

    def __init__(self, teachers: TeacherSet, cached: torch.Tensor, augment: bool = False, device="cpu"):
        self.cached = cached
        self.augment = augment
        self.models = [teachers.model(i).to(device) for i in range(len(teachers))] if augment else []

    @torch.no_grad()
    def __call__(self, members: list[int], batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """`(inputs, teacher_logits (K, B, C))` for this episode and batch."""
        inputs = batch["inputs"]
        if not self.augment:
            return inputs, self.cached[members][:, batch["index"].to(self.cached.device)]
        inputs = augment_batch(inputs)
        return inputs, torch.stack([logits_of(self.models[m](inputs)).float() for m in members])


def augment_batch(inputs: torch.Tensor) -> torch.Tensor:
    """A random augmentation of a batch of signals `(B, L)` or images `(B, C, H, W)`."""
    if inputs.dim() == 2:
        shifted = torch.roll(inputs, shifts=int(torch.randint(-2, 3, ())), dims=1)
        return shifted + 0.05 * inputs.std() * torch.randn_like(inputs)
    flip = torch.rand(inputs.shape[0], device=inputs.device) < 0.5
    out = torch.where(flip[:, None, None, None], inputs.flip(-1), inputs)
    dy, dx = (int(v) for v in torch.randint(-4, 5, (2,)))
    return torch.roll(out, shifts=(dy, dx), dims=(-2, -1))


# -------------------------------------------------------------------------------- the training loop
@dataclass
class EpisodeConfig:
    """How episodes are drawn and scored; `examples/train.py` and the benchmark train with the same one."""

    k_min: int = 2
    k_max: int = 6
    alpha: float = 0.9
    temperature: float = 4.0
    seed: int = 0


# ------------------------------------------------------------------------------- validation teachers
class ValidationTeachers:
    """Teacher sets kept out of training that choose which generator to keep (`load_best_model_at_end`).

    `scores(generator)` makes a student for each set and returns its `loss`, the training objective
    (`kd_loss` with the episodes' alpha and temperature), and its `accuracy`, both averaged over the sets, on
    `inputs`: the validation data (the meta split the generator trains on, or rows of it kept out of its
    batches). The teachers are what is new to the generator, so a generator that memorises its training
    teachers scores worse here. `TrainingProgress.metric_for_best_model` says which score chooses. The
    untrained generator returns each set's anchor unchanged, so step 0 is a candidate: where training does not
    help on teachers it never saw, the anchor is what comes out.

    `teachers` holds the validation teachers only; `sets` are (member indices into it, anchor position);
    `logits` `(len(teachers), N, C)` are their logits on `inputs`. `prepare_student(student)`, when given,
    runs on each generated student before it is scored, as it will run before the student is used (e.g.
    `recompute_bn_stats`); without it the students run functionally, as in training.
    """

    def __init__(
        self,
        teachers: TeacherSet,
        sets: Sequence[tuple[list[int], int]],
        inputs: torch.Tensor,
        labels: torch.Tensor,
        logits: torch.Tensor,
        episodes: EpisodeConfig,
        batch_size: int = 2048,
        prepare_student: Callable[[nn.Module], nn.Module] | None = None,
    ):
        if not sets:
            raise PoolConfigError("validation needs at least one set of validation teachers")
        if logits.shape[:2] != (len(teachers), len(inputs)) or len(labels) != len(inputs):
            raise PoolConfigError(
                f"validation logits {tuple(logits.shape)} do not match {len(teachers)} validation teachers "
                f"and {len(inputs)} inputs ({len(labels)} labels)"
            )
        self.teachers, self.sets = teachers, [(list(m), a) for m, a in sets]
        self.inputs, self.labels, self.logits = inputs, labels, logits
        self.episodes, self.batch_size, self.prepare_student = episodes, batch_size, prepare_student

    def scores(self, generator: nn.Module) -> dict[str, float]:
        """`{"loss", "accuracy"}` of the students `generator` makes, averaged over the sets (the generator's
        train/eval mode is restored)."""
        loss, correct, count = self.totals(generator).tolist()
        return {"loss": loss / count, "accuracy": correct / count}

    @torch.no_grad()
    def totals(self, generator: nn.Module, rank: int = 0, world_size: int = 1) -> torch.Tensor:
        """`[summed loss, correct predictions, examples]` (float64) over this rank's share of the sets
        (`sets[rank::world_size]`): summed over ranks, they give every set's scores once."""
        from .modeling import run_student

        was_training = generator.training
        generator.eval()
        loss = correct = count = 0.0
        try:
            device = next(generator.parameters()).device
            for members, anchor in self.sets[rank::world_size]:
                subset = self.teachers.subset(members)
                if self.prepare_student is None:  # functionally, as in training
                    forward = partial(run_student, subset, generator(subset, anchor=anchor).student_state)
                else:  # as the student will be used
                    forward = self.prepare_student(generator.generate_student(subset, anchor, device=device))
                for i in range(0, len(self.inputs), self.batch_size):
                    x = self.inputs[i : i + self.batch_size].to(device)
                    logits = logits_of(forward(x)).float()
                    targets = self.logits[members, i : i + self.batch_size].to(device)
                    labels = self.labels[i : i + self.batch_size].to(device)
                    batch = kd_loss(logits, targets, labels, self.episodes.alpha, self.episodes.temperature)
                    loss += batch.item() * len(x)
                    correct += (logits.argmax(-1) == labels).sum().item()
                count += len(self.inputs)
        finally:
            generator.train(was_training)
        return torch.tensor([loss, correct, count], dtype=torch.float64)


def optimizer_and_scheduler(
    generator: nn.Module,
    learning_rate: float,
    weight_decay: float,
    lr_scheduler_type: str,
    num_warmup_steps: int,
    max_train_steps: int,
    num_processes: int = 1,
):
    """AdamW and a transformers `get_scheduler` schedule. Accelerate steps a prepared scheduler once per
    process per optimizer step, hence the step counts times `num_processes`."""
    from transformers import get_scheduler

    optimizer = torch.optim.AdamW(generator.parameters(), lr=learning_rate, weight_decay=weight_decay)
    scheduler = get_scheduler(
        lr_scheduler_type, optimizer, num_warmup_steps * num_processes, max_train_steps * num_processes
    )
    return optimizer, scheduler


def train_generator(
    accelerator,
    generator: nn.Module,
    optimizer,
    scheduler,
    train_dataloader,
    teachers: TeacherSet,
    targets: TeacherTargets,
    episodes: EpisodeConfig,
    max_train_steps: int,
    progress: TrainingProgress,
    max_grad_norm: float = 1.0,
    logging_steps: int = 50,
    checkpointing_steps: int | None = None,
    save_checkpoint: Callable[[], None] | None = None,
    on_log: Callable[[int, float], None] | None = None,
    show_progress: bool = True,
    validation: ValidationTeachers | None = None,
    eval_steps: int | None = None,
    on_validate: Callable[[int, dict[str, float], bool], None] | None = None,
) -> list[float]:
    """Episodic training of `generator` (objects already `accelerator.prepare`d) until `max_train_steps`.

    Each micro-step draws an episode (K ∈ [k_min, k_max] teachers of `teachers` and an anchor, derived from
    the seed, step and rank, so a resumed run draws the same ones), generates the student, and back-propagates
    `episode_loss` on one batch of `train_dataloader`. A resumed `progress` skips the batches already seen.
    SIGTERM/SIGINT set accelerate's trigger, so every rank stops at the same step: the checkpoint is saved
    (`save_checkpoint`) and `SystemExit(128 + signal)` is raised. `on_log(step, loss)` receives the loss
    averaged over ranks every `logging_steps`. Returns this rank's episode losses.

    With `validation`, the generator is scored at step 0 (the untrained generator: every anchor unchanged),
    every `eval_steps` and at the last step; `on_validate(step, scores, is_best)` sees each. At the end the
    weights with the best validation score (`progress.metric_for_best_model`: the lowest loss or the highest
    accuracy) are loaded back into the generator (the step is `progress.best_step`).
    """
    import signal

    if len(train_dataloader) == 0:  # else the epoch arithmetic below divides by zero
        examples = len(getattr(train_dataloader, "dataset", ()))
        raise WeightFormerError(
            f"the training dataloader yields no batches: its batch size is larger than the {examples} examples "
            "of the meta split (per process) and incomplete batches are dropped; use a smaller batch size"
        )
    accumulation = accelerator.gradient_accumulation_steps
    stop: dict = {}
    previous = {  # every rank saves at the same step (set/check_trigger)
        sig: signal.signal(sig, lambda s, _f: (stop.setdefault("signal", s), accelerator.set_trigger()))
        for sig in (signal.SIGTERM, signal.SIGINT)
    }
    bar = tqdm(
        total=max_train_steps, initial=progress.step, disable=not (show_progress and accelerator.is_main_process)
    )
    micro, window, local = progress.step * accumulation, [], []
    model = accelerator.unwrap_model(generator)

    def validate() -> None:  # each rank scores its share of the sets; every rank gets the sums, keeps the same step
        totals = validation.totals(model, accelerator.process_index, accelerator.num_processes)
        if accelerator.num_processes > 1:  # one process has nothing to sum, and MPS has no float64 to move to
            totals = accelerator.reduce(totals.to(accelerator.device), "sum")
        loss, correct, count = totals.tolist()
        scores = {"loss": loss / count, "accuracy": correct / count}
        is_best = progress.record(progress.step, scores, model)
        if on_validate is not None:
            on_validate(progress.step, scores, is_best)

    if validation is not None and not progress.validation:
        validate()
    try:
        while progress.step < max_train_steps:
            if hasattr(train_dataloader, "set_epoch"):
                train_dataloader.set_epoch(micro // len(train_dataloader))
            skip = micro % len(train_dataloader)
            for batch in accelerator.skip_first_batches(train_dataloader, skip) if skip else train_dataloader:
                with accelerator.accumulate(generator):
                    rng = episode_rng(episodes.seed, micro, accelerator.process_index)
                    members, anchor = sample_episode(rng, len(teachers), episodes.k_min, episodes.k_max)
                    inputs, teacher_logits = targets(members, batch)
                    with accelerator.autocast():
                        loss = episode_loss(generator, teachers, (members, anchor), inputs, batch["labels"],
                                            teacher_logits, episodes.alpha, episodes.temperature)  # fmt: skip
                    # the loss averaged over ranks, before any step: every rank sees the same value, so a
                    # non-finite one stops them all before it reaches the weights (NaN gradients would)
                    mean_loss = accelerator.reduce(loss.detach(), "mean").item()
                    if not math.isfinite(mean_loss):
                        raise WeightFormerError(
                            f"the training loss is {mean_loss} at step {progress.step + 1} (episode of teachers "
                            f"{[teachers.infos[m].name for m in members]}): NaN or inf teacher logits or inputs, or a "
                            "learning rate that diverged; nothing of this step was applied, and the checkpoints "
                            "saved so far are unchanged"
                        )
                    accelerator.backward(loss)
                    if accelerator.sync_gradients:
                        accelerator.clip_grad_norm_(generator.parameters(), max_grad_norm)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad()
                micro += 1
                local.append(loss.item())
                window.append(mean_loss)
                if accelerator.sync_gradients:
                    progress.step += 1
                    bar.update(1)
                    if progress.step % logging_steps == 0 or progress.step == max_train_steps:
                        if on_log is not None:
                            on_log(progress.step, sum(window) / len(window))
                        window = []
                    if validation is not None and (
                        progress.step == max_train_steps or (eval_steps and progress.step % eval_steps == 0)
                    ):
                        validate()
                    if checkpointing_steps and progress.step % checkpointing_steps == 0 and save_checkpoint:
                        save_checkpoint()
                if accelerator.check_trigger():
                    if save_checkpoint is not None:
                        save_checkpoint()
                        accelerator.print(
                            f"caught signal {stop.get('signal', '')}: checkpoint saved at step {progress.step}; "
                            "resume with --resume_from_checkpoint latest"
                        )
                    raise SystemExit(128 + int(stop.get("signal", signal.SIGTERM)))
                if progress.step >= max_train_steps:
                    break
    finally:
        bar.close()
        for sig, handler in previous.items():  # past the loop nobody checks the trigger: signals act at once
            signal.signal(sig, handler)
    if validation is not None and progress.best_state is not None:
        model.load_state_dict(progress.best_state)
    return local


# --------------------------------------------------------------------------------- teacher logits
class TeacherLogitsCache:
    """Teacher logits on fixed data, one safetensors file per (teacher identity, data fingerprint).

    The fingerprint names the dataset and the transform (`data.fingerprint`), so a different split,
    dataset version or preprocessing misses the cache instead of reading stale logits. In multi-process
    runs call `logits` on the main process first: the other ranks then only read the files.
    """

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def path(self, identity: str, fingerprint: str) -> Path:
        key = hashlib.sha256(f"{identity}\n{fingerprint}".encode()).hexdigest()[:32]
        return self.root / f"{key}.safetensors"

    def logits(
        self,
        teachers: TeacherSet,
        split,
        fingerprint: str,
        batch_size: int = 1024,
        device: torch.device | str = "cpu",
        show_progress: bool = True,
    ) -> torch.Tensor:
        """`(len(teachers), len(split), C)` fp32 logits, row order of `split`, computed where missing."""
        out = []
        for i, info in enumerate(tqdm(teachers.infos, desc="teacher logits", disable=not show_progress)):
            path = self.path(info.identity, fingerprint)
            cached = self._read(path, len(split))
            if cached is not None:
                out.append(cached)
                continue
            model = teachers.model(i).to(device)
            logits = batch_logits(lambda x, m=model: logits_of(m(x)), split, batch_size, device)
            check_finite_logits(logits, info.name)  # before caching: such logits are not worth keeping
            self.root.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
            save_file({"logits": logits.contiguous()}, tmp, metadata={"teacher": info.identity, "data": fingerprint})
            os.replace(tmp, path)  # atomic: readers never see a half-written file
            out.append(logits)
        return torch.stack(out)

    @staticmethod
    def _read(path: Path, rows: int) -> torch.Tensor | None:
        """The cached logits at `path`, or None when absent or unusable (truncated, another row count, NaN):
        those are computed again and the file replaced, with a warning for a file that was there."""
        if not path.exists():
            return None
        try:
            logits = load_file(path)["logits"]
            if logits.dim() == 2 and len(logits) == rows and torch.isfinite(logits).all():
                return logits
            problem = f"shape {tuple(logits.shape)} for {rows} rows" if len(logits) != rows else "NaN or inf values"
        except (SafetensorError, OSError, KeyError) as err:
            problem = first_line(err)
        warnings.warn(f"cached teacher logits {str(path)!r} are unusable ({problem}): computing them again",
                      stacklevel=3)
        return None


@torch.no_grad()
def batch_logits(
    forward: Callable[[torch.Tensor], torch.Tensor],
    split,
    batch_size: int = 1024,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """`forward` over a transformed split in row order, fp32 on the CPU."""
    chunks = []
    for start in range(0, len(split), batch_size):
        inputs = torch.as_tensor(split[start : start + batch_size]["inputs"]).to(device)
        chunks.append(forward(inputs).float().cpu())
    return torch.cat(chunks)


# ------------------------------------------------------------------------------------ evaluation
@torch.no_grad()
def predict(
    model: nn.Module, dataloader: Iterable[dict], gather: Callable | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(logits, index)` of `model` over `dataloader`; `gather` is `accelerator.gather_for_metrics` when
    the loader is sharded over processes (every rank then gets every row, padding removed)."""
    model.eval()
    logits, index = [], []
    for batch in dataloader:
        out = logits_of(model(batch["inputs"])).float()
        idx = batch["index"]
        if gather is not None:
            out, idx = gather((out, idx))
        logits.append(out.cpu())
        index.append(idx.cpu())
    logits, index = torch.cat(logits), torch.cat(index)
    order = torch.argsort(index)  # back to row order, so teacher logits line up by row
    return logits[order], index[order]


def load_accuracy_metric():
    """The project's own `evaluate` accuracy module, loaded by path (works offline)."""
    import evaluate

    return evaluate.load(str(Path(__file__).parent / "metrics" / "accuracy"))


def _accuracy(metric, probs_or_logits: torch.Tensor, labels: torch.Tensor) -> float:
    preds = probs_or_logits.argmax(-1)
    return float(metric.compute(predictions=preds.tolist(), references=labels.tolist())["accuracy"])


def score_set(
    metric,
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
) -> dict[str, float]:
    """The figures of one held-out set: singles, ensemble, student, G, student NLL and ECE."""
    singles = [_accuracy(metric, t, labels) for t in teacher_logits]
    single_mean = sum(singles) / len(singles)
    ensemble = _accuracy(metric, ensemble_probs(list(teacher_logits)), labels)
    probs = F.softmax(student_logits.float(), dim=-1)
    student = _accuracy(metric, probs, labels)
    return {
        "single_accuracies": singles,
        "single_mean_accuracy": single_mean,
        "ensemble_accuracy": ensemble,
        "student_accuracy": student,
        "gain_recovered": gain_recovered(student, single_mean, ensemble),
        "student_nll": nll(probs, labels),
        "student_ece": ece(probs, labels),
    }


def evaluate_heldout(
    generator: nn.Module,
    teachers: TeacherSet,
    sets: Sequence[tuple[list[int], int]],
    test_logits: torch.Tensor,
    test_labels: torch.Tensor,
    test_loader: Iterable[dict],
    gather: Callable | None = None,
    finetune: Callable[[nn.Module, list[int]], nn.Module] | None = None,
    prepare_student: Callable[[nn.Module], nn.Module] | None = None,
    device: torch.device | str = "cpu",
    baselines: dict[str, Callable[[list[int], int], nn.Module]] | None = None,
) -> dict:
    """Generate a student for each held-out set and score it: the `eval_results.json` dict.

    `teachers` is the whole pool; `sets` hold pool indices and the anchor's position; `test_logits` are
    the pool's cached test logits `(pool, N, C)`. `finetune(student, members)`, when given, returns the
    student briefly distilled on the set's ensemble; G before and after are both reported.
    `prepare_student(student)` runs right after generation (e.g. `recompute_bn_stats`). `baselines` maps a
    name to `fn(members, anchor) -> model` (e.g. KD of the anchor); each is scored next to the student.
    """
    metric = load_accuracy_metric()
    results = []
    for members, anchor in sets:
        subset = teachers.subset(members)
        student = generator.generate_student(subset, anchor=anchor, device=device)
        if prepare_student is not None:
            student = prepare_student(student)
        logits, _ = predict(student, test_loader, gather)
        entry = {
            "teachers": subset.names,
            "anchor": subset.names[anchor],
            **score_set(metric, logits, test_logits[members], test_labels),
        }
        anchor_acc = entry["single_accuracies"][anchor]
        entry["anchor_accuracy"] = anchor_acc
        entry["anchor_gain_recovered"] = gain_recovered(
            anchor_acc, entry["single_mean_accuracy"], entry["ensemble_accuracy"]
        )
        for name, make in (baselines or {}).items():
            base_logits, _ = predict(make(members, anchor).to(device), test_loader, gather)
            scored = score_set(metric, base_logits, test_logits[members], test_labels)
            entry.update(
                {f"{name}_{k.removeprefix('student_')}": scored[k] for k in ("student_accuracy", "gain_recovered",
                                                                              "student_nll")}
            )
        if finetune is not None:
            tuned_logits, _ = predict(finetune(student, members), test_loader, gather)
            tuned = score_set(metric, tuned_logits, test_logits[members], test_labels)
            entry.update({f"finetuned_{k}": tuned[k] for k in ("student_accuracy", "gain_recovered", "student_nll")})
        results.append(entry)
    summary = {
        "k": len(sets[0][0]) if sets else 0,
        "heldout_sets": results,
        "mean_gain_recovered": _mean(r["gain_recovered"] for r in results),
        "mean_anchor_gain_recovered": _mean(r["anchor_gain_recovered"] for r in results),
    }
    if finetune is not None:
        summary["mean_finetuned_gain_recovered"] = _mean(r["finetuned_gain_recovered"] for r in results)
    for name in baselines or {}:
        summary[f"mean_{name}_gain_recovered"] = _mean(r[f"{name}_gain_recovered"] for r in results)
    summary["distinct_sets"] = len({tuple(sorted(r["teachers"])) for r in results})
    summary["baselines"] = list(baselines or {})
    return summary


def _mean(values: Iterable[float]) -> float:
    values = [v for v in values if not math.isnan(v)]
    return sum(values) / len(values) if values else float("nan")


def eval_table(results: dict) -> str:
    """The held-out results as a Markdown table (one row per set, then the means, with the anchor and each
    baseline next to the student)."""
    tuned = "mean_finetuned_gain_recovered" in results
    names = results.get("baselines", [])
    head = ["set", "anchor", "single", "ensemble", "student", "G", "anchor G"] + [f"{n} G" for n in names]
    head += ["NLL", "ECE"] + (["tuned acc", "tuned G"] if tuned else [])
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, r in enumerate(results["heldout_sets"]):
        cells = [
            str(i),
            Path(r["anchor"]).name,
            f"{r['single_mean_accuracy']:.4f}",
            f"{r['ensemble_accuracy']:.4f}",
            f"{r['student_accuracy']:.4f}",
            f"{r['gain_recovered']:.3f}",
            f"{r['anchor_gain_recovered']:.3f}",
            *(f"{r[f'{n}_gain_recovered']:.3f}" for n in names),
            f"{r['student_nll']:.4f}",
            f"{r['student_ece']:.4f}",
        ]
        if tuned:
            cells += [f"{r['finetuned_student_accuracy']:.4f}", f"{r['finetuned_gain_recovered']:.3f}"]
        rows.append("| " + " | ".join(cells) + " |")
    sets = len(results["heldout_sets"])
    distinct = results.get("distinct_sets", sets)
    mean = f"mean G over {distinct} distinct held-out set{'s' if distinct != 1 else ''} = "
    mean += f"{results['mean_gain_recovered']:.3f} (anchor alone {results['mean_anchor_gain_recovered']:.3f}"
    mean += "".join(f", {n} {results[f'mean_{n}_gain_recovered']:.3f}" for n in names) + ")"
    if tuned:
        mean += f"; after fine-tuning {results['mean_finetuned_gain_recovered']:.3f}"
    return "\n".join(rows) + "\n" + mean


def write_eval_results(results: dict, output_dir: str | Path) -> Path:
    path = Path(output_dir) / "eval_results.json"
    path.write_text(json.dumps(results, indent=2))
    return path


def tracker_metrics(results: dict) -> dict[str, float]:
    """Flat scalars for `accelerator.log`."""
    out = {k: v for k, v in results.items() if isinstance(v, float)}
    for i, r in enumerate(results["heldout_sets"]):
        out.update({f"heldout_{i}/{k}": v for k, v in r.items() if isinstance(v, float)})
    return out


# ------------------------------------------------------------------------------ after generation
def recompute_bn_stats(
    student: nn.Module, batches: Iterable[dict | torch.Tensor], num_batches: int | None = None
) -> nn.Module:
    """Re-estimate every BatchNorm's running statistics on data (`torch.optim.swa_utils.update_bn`: a
    cumulative average over the batches); `batches` yield input tensors or dicts with `inputs`.

    Generated or merged weights change what each BatchNorm sees, so statistics copied or averaged from the
    teachers can be off; one pass over a few batches fixes them (the cheap part of REPAIR). Nothing else
    changes. Returns the model in eval mode.
    """
    from itertools import islice

    from torch.optim.swa_utils import update_bn

    inputs = (b["inputs"] if isinstance(b, dict) else b for b in batches)
    device = next(student.parameters()).device
    update_bn(islice(inputs, num_batches), student, device=device)
    return student.eval()


# ------------------------------------------------------------------------------------ checkpoints
def latest_checkpoint(folder: str | Path) -> Path:
    """The newest `step_*` checkpoint in `folder` (names sort by step)."""
    found = sorted(Path(folder).glob("step_*"))
    if not found:
        raise WeightFormerError(f"--resume_from_checkpoint latest: no checkpoint in {str(folder)!r}")
    return found[-1]


def prune_checkpoints(folder: str | Path, keep: int = 3) -> None:
    """Delete all but the `keep` newest `step_*` checkpoints."""
    import shutil

    for old in sorted(Path(folder).glob("step_*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


class TrainingProgress:
    """Optimizer steps done and, with validation teachers, every validation score and the best generator so
    far (its step, score and weights). `metric_for_best_model` names the score that chooses, as in
    transformers' `TrainingArguments`: `"loss"` (lower is better) or `"accuracy"` (higher is better).
    `accelerator.register_for_checkpointing` stores the numbers in every checkpoint; the weights go beside
    them as safetensors (`save_best` / `load_best`), never in a pickle."""

    BEST_FILE = "best_generator.safetensors"
    METRICS = ("loss", "accuracy")

    def __init__(self, metric_for_best_model: str = "loss", settings: dict | None = None):
        if metric_for_best_model not in self.METRICS:
            raise WeightFormerError(
                f"metric_for_best_model must be one of {self.METRICS}, not {metric_for_best_model!r}"
            )
        self.metric_for_best_model = metric_for_best_model
        # what decides the teachers and rows the generator trains on: a resumed run must have the same
        self.settings = dict(settings or {})
        self.step = 0
        self.best_step: int | None = None
        self.best_metric: float | None = None
        self.best_state: dict[str, torch.Tensor] | None = None
        self.validation: list[tuple[int, float, float]] = []  # (step, mean validation loss, accuracy)

    @property
    def greater_is_better(self) -> bool:
        return self.metric_for_best_model == "accuracy"

    def record(self, step: int, scores: dict[str, float], generator: nn.Module) -> bool:
        """Note validation scores; keep a CPU copy of the weights when the chosen metric is the best so far
        (ties keep the earlier step: fewer episodes, or the anchor itself). Returns whether it was."""
        self.validation.append((step, scores["loss"], scores["accuracy"]))
        value = scores[self.metric_for_best_model]
        if self.best_metric is not None and not (
            value > self.best_metric if self.greater_is_better else value < self.best_metric
        ):
            return False
        self.best_step, self.best_metric = step, value
        self.best_state = {k: v.detach().to("cpu", copy=True) for k, v in generator.state_dict().items()}
        return True

    def save_best(self, folder: str | Path) -> None:
        """Write the best weights into a checkpoint folder (nothing without validation)."""
        if self.best_state is not None:
            save_file({k: v.contiguous() for k, v in self.best_state.items()}, str(Path(folder) / self.BEST_FILE))

    def load_best(self, folder: str | Path) -> None:
        """Read back what `save_best` wrote, after `accelerator.load_state` restored the numbers."""
        if self.best_step is None:
            return
        path = Path(folder) / self.BEST_FILE
        if not path.is_file():
            raise WeightFormerError(
                f"checkpoint {str(folder)!r} records a best generator at step {self.best_step} but has no "
                f"{self.BEST_FILE}: the checkpoint is incomplete; resume from an earlier one"
            )
        self.best_state = load_file(str(path))

    def state_dict(self) -> dict:
        return {"step": self.step, "metric_for_best_model": self.metric_for_best_model, "settings": self.settings,
                "best_step": self.best_step, "best_metric": self.best_metric,
                "validation_steps": [s for s, _, _ in self.validation],
                "validation_losses": [v for _, v, _ in self.validation],
                "validation_accuracies": [a for _, _, a in self.validation]}  # fmt: skip

    def load_state_dict(self, state: dict) -> None:
        metric = state.get("metric_for_best_model", "loss")  # checkpoints before the option chose on the loss
        if state.get("best_step") is not None and metric != self.metric_for_best_model:
            raise WeightFormerError(
                f"the checkpoint kept its best generator by validation {metric}, this run chooses by "
                f"{self.metric_for_best_model}: resume with the same metric_for_best_model ({metric!r})"
            )
        saved = state.get("settings") or {}  # checkpoints before settings were stored are not checked
        changed = [f"{k}={v!r} (now {self.settings.get(k)!r})" for k, v in saved.items() if v != self.settings.get(k)]
        if changed:
            raise WeightFormerError(
                f"the checkpoint was written with {', '.join(changed)}: resume with the flags it was started with"
            )
        self.step = int(state["step"])
        self.best_step = state.get("best_step")
        self.best_metric = state.get("best_metric", state.get("best_loss"))
        self.best_state = None
        self.validation = list(zip(state.get("validation_steps", []), state.get("validation_losses", []),
                                   state.get("validation_accuracies", [])))  # fmt: skip
