"""Train a WeightFormer on a pool of teachers, then evaluate it on held-out teachers.

    accelerate launch examples/train.py     # offline default: MNIST-1D MLP fine-tunes of one base, CPU, minutes
    accelerate launch --multi_gpu --num_processes 2 examples/train.py --cpu   # 2 CPU ranks (gloo)
    accelerate launch examples/train.py --config cifar10-resnet18 --teachers org/r18-a org/r18-b ...

`--config` takes a preset from `hub_configs/` (or a JSON path); command-line flags override it. Generators
too large for one device: pick FSDP or DeepSpeed in `accelerate config` (wrap `WeightFormerBlock`, the
model's `_no_split_modules`); the script itself does not change.
"""

import argparse
import math
import os
import shutil
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, gather_object, set_seed
from torch.utils.data import DataLoader
from weightformer_hf.hub_configs import load_preset

from weightformer_hf import WeightFormerError, WeightFormerModel
from weightformer_hf import data as wf_data
from weightformer_hf import pool as wf_pool
from weightformer_hf import training as wf
from weightformer_hf.baselines import best_index, kd_anchor
from weightformer_hf.errors import first_line

# Flag → argparse options. Preset values become the defaults; flags given on the command line win.
FLAGS = {
    # The method's own flags.
    "teachers": dict(nargs="+", help="teacher folders, pool folders or Hub ids (default: the preset's pool)"),
    "pool_dir": dict(help="where the preset's pool lives (default ~/.cache/weightformer_hf/pools/<preset>)"),
    "shared_init": dict(action="store_true", help="pool variant: one initialisation, different data orders"),
    "k_min": dict(type=int), "k_max": dict(type=int),
    "alpha": dict(type=float), "temperature": dict(type=float),
    "num_eval_teachers": dict(type=int), "eval_k": dict(type=int), "num_heldout_sets": dict(type=int),
    "num_val_teachers": dict(type=int, default=0,
                             help="training teachers kept out of training to choose the generator to keep: the "
                                  "best validation score of step 0 (every anchor unchanged), every --eval_steps "
                                  "and the last step (0: keep the last step)"),
    "eval_steps": dict(type=int, help="steps between validation checks (default: a tenth of the run)"),
    "metric_for_best_model": dict(choices=wf.TrainingProgress.METRICS, default="loss",
                                  help="the validation score that chooses: the training objective or accuracy"),
    "val_data_fraction": dict(type=float, default=0.0,
                              help="share of the meta split kept out of the generator's batches to score the "
                                   "validation teachers (0: they are scored on the rows it trains on)"),
    "finetune_steps": dict(type=int, default=0), "finetune_learning_rate": dict(type=float, default=3e-4),
    "kd_baseline_steps": dict(type=int, default=1000,
                              help="score the anchor after this many KD steps next to each student (0: off)"),
    "recompute_bn_stats": dict(action="store_true", default=None),
    "online_augmentation": dict(action="store_true", help="augment batches; the K teachers then run live"),
    # Data (names of the Hugging Face image-classification example).
    "dataset_name": dict(help="mnist1d, mnist5k or a Hub dataset id"), "train_dir": {}, "validation_dir": {},
    "image_column_name": dict(default="image"), "label_column_name": dict(default="label"),
    # Training (names of the *_no_trainer.py examples).
    "output_dir": dict(help="default: outputs/weightformer-<preset name>"),
    "max_train_steps": dict(type=int), "num_train_epochs": dict(type=int),
    "per_device_train_batch_size": dict(type=int), "per_device_eval_batch_size": dict(type=int, default=1024),
    "learning_rate": dict(type=float), "weight_decay": dict(type=float), "max_grad_norm": dict(type=float),
    "lr_scheduler_type": {}, "num_warmup_steps": dict(type=int),
    "gradient_accumulation_steps": dict(type=int, default=1),
    "seed": dict(type=int, default=0), "logging_steps": dict(type=int, default=50),
    "checkpointing_steps": dict(type=int),
    "resume_from_checkpoint": dict(help="'latest' or a checkpoint folder"),
    "overwrite_output_dir": dict(action="store_true",
                                 help="replace the run already in --output_dir (its checkpoints are deleted first)"),
    "with_tracking": dict(action="store_true"), "report_to": dict(default="tensorboard"),
    "push_to_hub": dict(action="store_true"), "hub_model_id": {},
    "cpu": dict(action="store_true"), "mixed_precision": dict(choices=["no", "fp16", "bf16"]),
    "cpu_threads": dict(type=int, help="torch threads per process when training on CPU (default: what the launch "
                                       "set, except that a plain `accelerate launch` on a machine without a GPU, "
                                       "which leaves one, gets the physical cores per local process, as "
                                       "`accelerate launch --cpu` would)"),
}  # fmt: skip


# Flags a resumed run must keep (with the teachers, rows and seed): the checkpoint records them.
RESUME_FLAGS = (
    "per_device_train_batch_size", "gradient_accumulation_steps", "max_train_steps", "learning_rate", "weight_decay",
    "lr_scheduler_type", "num_warmup_steps", "k_min", "k_max", "alpha", "temperature",
)  # fmt: skip


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--config",
        default="mnist1d-mlp-finetune",
        help="preset name in hub_configs/ or a JSON file (default: fine-tunes of one base, built locally; "
        "mnist1d-mlp: from-scratch teachers)",
    )
    for name, options in FLAGS.items():
        parser.add_argument(f"--{name}", **options)
    config = parser.parse_known_args(argv)[0].config
    try:
        preset = load_preset(config)
        check_preset_keys(preset, config)
    except (WeightFormerError, FileNotFoundError) as err:
        parser.error(str(err))
    parser.set_defaults(**{k: v for k, v in preset.items() if k in FLAGS})
    args = parser.parse_args(argv)
    args.preset, args.preset_name = preset, Path(config).stem
    args.output_dir = args.output_dir or f"outputs/weightformer-{args.preset_name}"
    problem = flag_problem(args)
    if problem:
        parser.error(problem)
    return args


# Preset keys that are not flags: what the preset says about itself, its data, its pool and its generator.
PRESET_SECTIONS = ("description", "mnist1d", "pool", "generator")


def check_preset_keys(preset: dict, name: str) -> None:
    """Raise on a key no code reads (a misspelt `lerning_rate` would otherwise be dropped without a word)."""
    from difflib import get_close_matches

    from weightformer_hf.pool import PoolSpec

    def unknown(keys, known, where):
        bad = sorted(set(keys) - set(known))
        if bad:
            hints = [f"{k!r} (did you mean {m[0]!r}?)" if (m := get_close_matches(k, known, n=1)) else repr(k)
                     for k in bad]  # fmt: skip
            raise WeightFormerError(f"preset {name!r}: unknown {where} key(s) {', '.join(hints)}")

    unknown(preset, [*FLAGS, *PRESET_SECTIONS], "top-level")
    for section, known in (("pool", PoolSpec.__dataclass_fields__), ("generator", _generator_keys())):
        if not isinstance(preset.get(section, {}), dict):
            raise WeightFormerError(f"preset {name!r}: {section!r} must be a JSON object")
        unknown(preset.get(section, {}), list(known), section)


def _generator_keys() -> list[str]:
    import inspect

    from weightformer_hf import WeightFormerConfig

    return [k for k in inspect.signature(WeightFormerConfig.__init__).parameters if k not in ("self", "kwargs")]


# Settings with no default of their own: every preset in hub_configs/ sets them, and a preset of one's own
# must too (or the command line), else AdamW or the scheduler would fail on None minutes into a run.
REQUIRED = (
    "k_min", "k_max", "alpha", "temperature", "num_eval_teachers", "eval_k", "num_heldout_sets",
    "per_device_train_batch_size", "learning_rate", "weight_decay", "max_grad_norm", "lr_scheduler_type",
    "num_warmup_steps",
)  # fmt: skip


def flag_problem(args) -> str | None:
    """What is wrong with the flags' values, in words, or None: caught here rather than as a trace from
    torch, accelerate or transformers (or as a NaN loss, for a zero temperature) minutes later."""
    from transformers import SchedulerType

    missing = [f"--{name}" for name in REQUIRED if getattr(args, name, None) is None]
    if args.max_train_steps is None and args.num_train_epochs is None:
        missing.append("--max_train_steps (or --num_train_epochs)")
    if missing:
        return (
            f"preset {getattr(args, 'preset_name', args.config)!r} sets no {', '.join(missing)}: add them to it or "
            "pass them as flags (hub_configs/mnist1d-mlp.json sets every one)"
        )

    at_least = {"per_device_train_batch_size": 1, "per_device_eval_batch_size": 1, "gradient_accumulation_steps": 1,
                "logging_steps": 1, "num_heldout_sets": 1, "eval_k": 1, "max_train_steps": 0, "num_train_epochs": 1,
                "checkpointing_steps": 1, "eval_steps": 1, "num_val_teachers": 0, "num_eval_teachers": 1,
                "kd_baseline_steps": 0, "finetune_steps": 0, "num_warmup_steps": 0, "cpu_threads": 1}  # fmt: skip
    for name, least in at_least.items():
        value = getattr(args, name, None)
        if value is not None and value < least:
            return f"--{name} must be at least {least}, got {value}"
    for name in ("learning_rate", "finetune_learning_rate", "temperature", "max_grad_norm"):
        value = getattr(args, name, None)
        if value is not None and not (value > 0 and math.isfinite(value)):
            return f"--{name} must be a positive number, got {value}"
    if args.weight_decay is not None and not args.weight_decay >= 0:
        return f"--weight_decay must be at least 0, got {args.weight_decay}"
    if args.alpha is not None and not 0 <= args.alpha <= 1:
        return f"--alpha (the KD weight; CE gets 1 - alpha) must be in [0, 1], got {args.alpha}"
    if not 0 <= args.val_data_fraction < 1:
        return f"--val_data_fraction must be in [0, 1), got {args.val_data_fraction}"
    schedulers = [s.value for s in SchedulerType]
    if args.lr_scheduler_type is not None and args.lr_scheduler_type not in schedulers:
        return f"--lr_scheduler_type {args.lr_scheduler_type!r} is not one of {', '.join(schedulers)}"
    if args.with_tracking:
        from accelerate.utils import LoggerType

        trackers = {t.value for t in LoggerType} | {"all"}
        bad = [t for t in args.report_to.split(",") if t.strip() not in trackers]
        if bad:
            return f"--report_to {', '.join(bad)}: not a tracker accelerate knows ({', '.join(sorted(trackers))})"
    return None


def load_checkpoint(accelerator, path: Path) -> None:
    """`accelerator.load_state(path)`, with a clear error for a folder that is not a whole checkpoint of this
    run (missing, emptied, truncated files, another generator): nothing is changed by a failed resume."""
    if not path.is_dir():
        raise WeightFormerError(f"--resume_from_checkpoint {str(path)!r}: no such checkpoint folder")
    missing = [n for n in ("model.safetensors", "optimizer.bin") if not (path / n).is_file()]
    if missing:
        raise WeightFormerError(
            f"--resume_from_checkpoint {str(path)!r} is not a checkpoint of this script: it lacks {', '.join(missing)} "
            f"(checkpoints are the step_* folders under <output_dir>/checkpoints)"
        )
    try:
        accelerator.load_state(str(path))
    except WeightFormerError:
        raise
    except Exception as err:  # safetensors, torch's unpickler and load_state_dict raise several kinds
        raise WeightFormerError(
            f"cannot resume from {str(path)!r}: {first_line(err)} (a truncated checkpoint, or one of another generator "
            "configuration?)"
        ) from err


def check_output_dir(output_dir: str, resume: bool, overwrite: bool) -> None:
    """Refuse to write a new run over one already in `output_dir` (or over a model folder): its generator,
    results and checkpoints would be replaced, and `latest` would mix the two runs' checkpoints."""
    out = Path(output_dir)
    if resume or overwrite or not out.is_dir():
        return
    found = [n for n in ("checkpoints", "model.safetensors", "config.json", "eval_results.json") if (out / n).exists()]
    if found:
        raise WeightFormerError(
            f"--output_dir {output_dir!r} already holds a run or a model ({', '.join(found)}): pass "
            "--resume_from_checkpoint latest to continue it, --overwrite_output_dir to replace it, or another "
            "--output_dir (nothing was changed)"
        )


def cpu_threads(device: torch.device, requested: int | None, local_processes: int) -> int | None:
    """The torch threads a process training on `device` should use, or None to keep what it has.

    `accelerate launch` sets `OMP_NUM_THREADS` for the script. Given `--cpu` it uses the physical cores per
    local process; without it (the plain `accelerate launch examples/train.py`, no config) it sets 1, so on a
    machine without a GPU the default run used one core of two: 14.5 against 8.6 minutes on a 2-core AMD EPYC.
    Such a launch (`ACCELERATE_USE_CPU=False`, one thread, a CPU device) gets accelerate's `--cpu` count.
    `--cpu_threads N` always wins; runs started without the launcher keep their own setting.
    """
    if device.type != "cpu":
        return None
    if requested is not None:
        return requested
    plain_launch = os.environ.get("ACCELERATE_USE_CPU", "").lower() == "false"
    if not plain_launch or os.environ.get("OMP_NUM_THREADS") != "1" or torch.get_num_threads() != 1:
        return None
    import psutil

    threads = (psutil.cpu_count(logical=False) or 1) // max(local_processes, 1)
    return threads if threads > 1 else None


def main(args):
    check_output_dir(args.output_dir, bool(args.resume_from_checkpoint), args.overwrite_output_dir)
    accelerator = Accelerator(
        cpu=args.cpu, mixed_precision=args.mixed_precision,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with=args.report_to if args.with_tracking else None,
        project_config=ProjectConfiguration(project_dir=args.output_dir),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),  # resumable data order
    )  # fmt: skip
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))
    threads = cpu_threads(accelerator.device, args.cpu_threads, local_processes)
    if threads is not None and threads != torch.get_num_threads():
        if args.cpu_threads is None:
            accelerator.print(f"training on {threads} CPU threads per process (`accelerate launch` without --cpu "
                              "sets one; --cpu_threads 1 keeps one)")  # fmt: skip
        torch.set_num_threads(threads)
    with accelerator.main_process_first():  # rank 0 builds the pool and fills the logits cache; others read
        raw = wf_data.load_raw_splits(
            args.dataset_name, args.train_dir, args.validation_dir, args.image_column_name,
            args.label_column_name, mnist1d=args.preset.get("mnist1d"), seed=args.seed,
        )  # fmt: skip
        teachers = wf_pool.resolve_pool(
            args.teachers, args.preset, args.preset_name, raw, args.dataset_name, args.pool_dir,
            args.shared_init, may_build=accelerator.is_main_process,
        )  # fmt: skip
        aligned = wf_data.align_labels(teachers.label_names, raw)
        if aligned is not raw:  # the same classes in another order: the teachers' numbering wins
            accelerator.print(f"renumbered the dataset's labels to the teachers' order: {teachers.label_names}")
            raw = aligned
        wf_data.check_labels(teachers.label_names, raw["train"], args.dataset_name or args.train_dir)
        splits = wf_data.task_splits(raw, transform := wf_data.transform_for(raw, teachers))
        cache = wf.TeacherLogitsCache(wf_data.cache_root() / "teacher_logits")
        logits = {  # (pool, rows, classes) per split, computed once per teacher and data
            s: cache.logits(teachers, splits[s], wf_data.fingerprint(splits[s], transform),
                            show_progress=accelerator.is_main_process)
            for s in ("meta", "test")
        }  # fmt: skip
    set_seed(args.seed)  # after a possible pool build, so a first run equals later runs
    train_idx, eval_idx = wf.split_pool(len(teachers), args.num_eval_teachers, args.seed)
    val_idx = []
    if args.num_val_teachers:
        kept, held = wf.split_pool(len(train_idx), args.num_val_teachers, args.seed + 1, "validation",
                                   "--num_val_teachers")  # fmt: skip
        train_idx, val_idx = [train_idx[i] for i in kept], [train_idx[i] for i in held]
    wf.check_k(len(train_idx), len(eval_idx), args.k_min, args.k_max, args.eval_k, len(val_idx))

    def meta_batches():  # the same batches on every rank and at every call (a resumed run sees the same)
        return DataLoader(wf_data.BatchedSplit(splits["meta"]), batch_size=256, shuffle=True,
                          collate_fn=wf_data.collate, generator=torch.Generator().manual_seed(args.seed))

    def recompute_bn(student):
        return wf.recompute_bn_stats(student, meta_batches(), num_batches=20)

    validation, train_rows = None, range(len(splits["meta"]))
    if val_idx:  # on (at most 10,000) meta rows: with --val_data_fraction, rows the generator never trains on
        val_sets = wf.validation_sets(range(len(val_idx)), {2, args.eval_k}, seed=args.seed)
        if not val_sets:
            raise WeightFormerError("--num_val_teachers needs at least 2 validation teachers to make a set")
        train_rows, val_rows = wf.validation_rows(len(splits["meta"]), args.val_data_fraction, args.seed)
        val_rows = (val_rows or train_rows)[:10_000]
        val_x, val_y = wf_data.tensors(splits["meta"].select(val_rows))
        validation = wf.ValidationTeachers(
            teachers.subset(val_idx).to(accelerator.device), val_sets, val_x, val_y,
            logits["meta"][val_idx][:, val_rows], wf.EpisodeConfig(alpha=args.alpha, temperature=args.temperature),
            prepare_student=recompute_bn if args.recompute_bn_stats else None,
        )  # fmt: skip
    elif args.val_data_fraction:
        raise WeightFormerError("--val_data_fraction keeps meta rows for validation teachers: set --num_val_teachers")
    train_teachers = teachers.subset(train_idx).to(accelerator.device)  # tokens are built on the device
    targets = wf.TeacherTargets(train_teachers, logits["meta"][train_idx].to(accelerator.device),
                                args.online_augmentation, accelerator.device)  # fmt: skip

    generator = WeightFormerModel.for_teachers(train_teachers, **args.preset.get("generator", {}))
    generator.config.training_pool = [i.identity for i in train_teachers.infos]
    meta_train = splits["meta"] if len(train_rows) == len(splits["meta"]) else splits["meta"].select(train_rows)
    train_dl = DataLoader(wf_data.BatchedSplit(meta_train), batch_size=args.per_device_train_batch_size,
                          shuffle=True, drop_last=True, collate_fn=wf_data.collate)  # fmt: skip
    if len(train_dl) < accelerator.num_processes:
        raise WeightFormerError(
            f"--per_device_train_batch_size {args.per_device_train_batch_size} leaves fewer full batches than "
            f"processes: the generator trains on {len(meta_train)} meta examples"
        )
    test_dl = DataLoader(wf_data.BatchedSplit(splits["test"]), batch_size=args.per_device_eval_batch_size,
                         collate_fn=wf_data.collate)
    updates_per_epoch = math.ceil(len(train_dl) / accelerator.num_processes / args.gradient_accumulation_steps)
    if args.num_train_epochs and not args.max_train_steps:
        args.max_train_steps = args.num_train_epochs * updates_per_epoch
    optimizer, scheduler = wf.optimizer_and_scheduler(
        generator, args.learning_rate, args.weight_decay, args.lr_scheduler_type, args.num_warmup_steps,
        args.max_train_steps, accelerator.num_processes,
    )  # fmt: skip
    generator, optimizer, train_dl, test_dl, scheduler = accelerator.prepare(
        generator, optimizer, train_dl, test_dl, scheduler
    )
    progress = wf.TrainingProgress(args.metric_for_best_model, settings={  # what a resumed run must not change
        "teachers": teachers.names, "train_teachers": train_teachers.names, "validation_teachers": len(val_idx),
        "val_data_fraction": args.val_data_fraction, "meta_rows": len(meta_train), "seed": args.seed,
        # the batches and episodes a step sees, and the schedule: load_state would silently keep the saved
        # learning rate and rebuild the schedule around the saved step count
        **{k: getattr(args, k) for k in RESUME_FLAGS},
    })  # fmt: skip
    accelerator.register_for_checkpointing(progress)
    if args.with_tracking:
        accelerator.init_trackers(
            "weightformer", {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))}
        )

    checkpoints = Path(args.output_dir) / "checkpoints"
    if args.overwrite_output_dir and not args.resume_from_checkpoint and accelerator.is_main_process:
        shutil.rmtree(checkpoints, ignore_errors=True)  # else `latest` could pick the replaced run's last one
    accelerator.wait_for_everyone()
    if args.resume_from_checkpoint:
        latest = args.resume_from_checkpoint == "latest"
        path = wf.latest_checkpoint(checkpoints) if latest else Path(args.resume_from_checkpoint)
        load_checkpoint(accelerator, path)
        progress.load_best(path)
        accelerator.print(f"resumed from {path} at step {progress.step}")

    def save_checkpoint():  # saved aside, renamed when complete: a kill never leaves half a checkpoint
        tmp = checkpoints / f".step_{progress.step:06d}.tmp"
        accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            progress.save_best(tmp)  # the best generator so far (with --num_val_teachers), as safetensors
            shutil.rmtree(final := checkpoints / tmp.name[1:-4], ignore_errors=True)  # a re-run of this step
            os.replace(tmp, final)
            wf.prune_checkpoints(checkpoints, keep=3)

    def log(step, loss):
        accelerator.print(f"step {step}: loss {loss:.6f} (mean over {accelerator.num_processes} process(es))")
        accelerator.log({"train/loss": loss, "lr": scheduler.get_last_lr()[0]}, step=step)

    def on_validate(step, scores, is_best):
        accelerator.print(f"step {step}: validation loss {scores['loss']:.6f}, accuracy {scores['accuracy']:.4f}"
                          f"{' (best so far)' if is_best else ''}")  # fmt: skip
        accelerator.log({f"eval/{k}": v for k, v in scores.items()}, step=step)

    accelerator.print(
        f"***** Running training: {len(train_idx)} training / {len(val_idx)} validation / {len(eval_idx)} held-out "
        "teachers, "
        f"{args.max_train_steps} steps, {accelerator.num_processes} process(es) *****"
    )
    episodes = wf.EpisodeConfig(args.k_min, args.k_max, args.alpha, args.temperature, args.seed)
    local = wf.train_generator(
        accelerator, generator, optimizer, scheduler, train_dl, train_teachers, targets, episodes,
        args.max_train_steps, progress, args.max_grad_norm, args.logging_steps, args.checkpointing_steps,
        save_checkpoint, log, validation=validation, eval_steps=args.eval_steps or max(1, args.max_train_steps // 10),
        on_validate=on_validate,
    )  # fmt: skip
    if validation is not None:
        accelerator.print(f"kept the generator of step {progress.best_step} (validation {args.metric_for_best_model} "
                          f"{progress.best_metric:.6f}"
                          f"{'; step 0 returns every anchor unchanged' if progress.best_step == 0 else ''})")
    # Rank 0 prints every rank's line, in rank order: ranks writing their own lines to one unbuffered pipe
    # interleaved mid-line ("...(validation loss 0.18)[rank 1/2] ...") and broke parsers of this output.
    per_rank = gather_object([(accelerator.process_index, len(local), sum(local) / max(len(local), 1))])
    for rank, episodes_run, mean_loss in sorted(per_rank):
        accelerator.print(f"[rank {rank}/{accelerator.num_processes}] {episodes_run} episodes, "
                          f"mean local loss {mean_loss:.6f}")

    # Held-out evaluation: students for several sets of teachers the generator never saw.
    unwrapped = accelerator.unwrap_model(generator)
    meta = {}  # the meta split as tensors, read only if fine-tuning or a baseline needs it

    def meta_tensors():
        if not meta:
            meta["x"], meta["y"] = wf_data.tensors(splits["meta"])
        return meta["x"], meta["y"]

    def distil(model, members, steps, learning_rate):  # KD on the set's ensemble over the meta split
        (meta_x, meta_y), device = meta_tensors(), accelerator.device
        return kd_anchor(model.to(device), meta_x.to(device), meta_y.to(device),
                         logits["meta"][members].to(device), steps=steps, learning_rate=learning_rate,
                         temperature=args.temperature, alpha=args.alpha, seed=args.seed)  # fmt: skip

    def finetune(student, members):  # --finetune_steps: the KD of `weightformer generate --finetune-steps`
        return distil(student, members, args.finetune_steps, args.finetune_learning_rate)

    def kd_anchor_baseline(members, anchor):  # what a user would do instead: the same KD from the anchor, at
        return distil(teachers.model(members[anchor]), members, args.kd_baseline_steps, 3e-4)  # kd_anchor_1k's lr

    def best_val_anchor_student(members, anchor):  # what `weightformer generate --anchor best` keeps
        correct = (logits["meta"][members].argmax(-1) == meta_tensors()[1]).float().mean(1)  # no teacher trained on it
        best = best_index(correct.tolist())
        student = unwrapped.generate_student(teachers.subset(members), anchor=best, device=accelerator.device)
        return recompute_bn(student) if args.recompute_bn_stats else student

    baselines = {"best_val_anchor_student": best_val_anchor_student}
    if args.kd_baseline_steps:
        baselines[f"kd_anchor_{args.kd_baseline_steps}"] = kd_anchor_baseline
    sets = wf.heldout_sets(eval_idx, args.eval_k, args.num_heldout_sets, args.seed)
    results = wf.evaluate_heldout(
        unwrapped, teachers, sets, logits["test"], wf_data.tensors(splits["test"])[1], test_dl,
        gather=accelerator.gather_for_metrics, finetune=finetune if args.finetune_steps else None,
        prepare_student=recompute_bn if args.recompute_bn_stats else None, device=accelerator.device,
        baselines=baselines,
    )
    results.update(train_teachers=train_teachers.names, finetune_steps=args.finetune_steps, train_steps=progress.step)
    if validation is not None:
        results.update(validation_teachers=teachers.subset(val_idx).names, kept_step=progress.best_step,
                       metric_for_best_model=args.metric_for_best_model, val_data_fraction=args.val_data_fraction,
                       validation_curve=progress.validation)  # fmt: skip
    accelerator.log(wf.tracker_metrics(results), step=progress.step)
    accelerator.wait_for_everyone()
    unwrapped.config.heldout_results = {k: v for k, v in results.items() if k != "heldout_sets"}
    unwrapped.save_pretrained(args.output_dir, is_main_process=accelerator.is_main_process)
    if accelerator.is_main_process:
        wf.write_eval_results(results, args.output_dir)
        accelerator.print(wf.eval_table(results))
        if args.push_to_hub:
            push(unwrapped, args)
    accelerator.end_training()


def push(generator, args):
    from weightformer_hf.push import push_generator_to_hub  # weights, config and model card in one commit

    commit = push_generator_to_hub(generator, args.hub_model_id or Path(args.output_dir).name)
    print(f"pushed the generator: {getattr(commit, 'commit_url', commit)}")


def cli(argv: list[str] | None = None) -> int:
    """The command line: `main` on the parsed flags; bad input prints one line and returns exit status 2."""
    try:
        main(parse_args(argv))
    except (WeightFormerError, FileNotFoundError) as err:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"train.py: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())
