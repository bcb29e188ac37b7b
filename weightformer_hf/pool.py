"""Teacher pools: build one (teachers trained from scratch, or fine-tunes of one pretrained base) or load one.

A built pool is a folder of Hub-format repos (`config.json`, `model.safetensors`, `README.md` with a
license), the pretrained `base/` for fine-tune pools (task arithmetic and TIES need it), and a `pool.json`
manifest written last. Teachers are trained in chunks and each is saved as soon as its chunk ends (folder
written aside, then renamed), so an interrupted build keeps every finished teacher and resumes with the rest.

Regimes (`PoolSpec.regime`):
- `scratch`: each teacher from its own initialisation and data order (or one shared initialisation,
  `shared_init`), recipe AdamW lr 2e-3, weight decay 1e-4, one-cycle, batch 128 (measured-baselines.md:
  85.0 % after 6k steps on MNIST-1D).
- `finetune`: one base pretrained on a *source* task that differs from the target (`finetune_source`:
  MNIST-1D drawn with other generator arguments, `base_data`; for image pools, scikit-learn's 8×8 digits
  upsampled to 28×28), then each teacher fine-tuned from it on the target with its own data order, learning
  rate 10^U[`finetune_log10_lr`] and length drawn from `finetune_steps`: the model-soup setting most Hub users
  are in.

Teachers without BatchNorm train many at once under `torch.func.vmap` (`teacher_training.train_models`), on
the caller's torch threads: the batched matmuls split across threads by model, so 1 and 2 threads give the
same bits (MLP, 1-D CNN and ViT teachers, tested on a 2-core AMD EPYC), and 2 threads took 45 instead of
73 ms a step for 26 MLPs there. Everything trained one model at a time (the base, BatchNorm teachers, a
chunk of one) runs on one thread: a second one changes their last bits.
"""

from __future__ import annotations

import copy
import json
import os
import random
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from datasets import DatasetDict
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModel, AutoModelForImageClassification

from .data import (
    Transform,
    cache_root,
    digits_splits,
    image_transform,
    label_names_of,
    mnist1d_tensors,
    signal_transform,
    task_splits,
    tensors,
)
from .errors import TeacherSourceError, WeightFormerError
from .evaluation import logits_of
from .hub import load_teachers, no_progress_bars
from .teacher_training import has_batchnorm, train_models
from .teachers import TeacherSet

MANIFEST = "pool.json"
PROGRESS = "build.json"  # the spec of a build in progress: finished teachers are kept only for the same spec
RECORD = "weightformer_teacher.json"  # per teacher: its recipe, test accuracy and training seconds


# The fine-tune regime's source task: MNIST-1D drawn with other generator settings (`mnist1d_tensors` kwargs).
DEFAULT_BASE_DATA = {
    "num_samples": 20000, "seed": 77, "scale_coeff": 0.6, "max_translation": 60, "corr_noise_scale": 0.4,
}  # fmt: skip


@dataclass
class PoolSpec:
    """How to build a pool: the teacher architecture (`model`: `model_type` + config kwargs, or `timm`: name +
    kwargs), the regime and the recipe. See the module docstring for the regimes."""

    model: dict = field(default_factory=lambda: {"model_type": "wf_mlp", "hidden_sizes": [256, 256]})
    num_teachers: int = 16
    train_steps: int = 6000
    batch_size: int = 128
    learning_rate: float = 2e-3
    weight_decay: float = 1e-4
    seed: int = 0
    shared_init: bool = False
    regime: str = "scratch"  # "scratch" | "finetune"
    base_steps: int = 3000  # finetune: pretraining steps of the base on the source task
    base_data: dict = field(default_factory=dict)  # finetune: the source task, over DEFAULT_BASE_DATA
    finetune_log10_lr: tuple[float, float] = (-3.3, -2.5)
    finetune_steps: tuple[int, ...] = (1500, 3000)
    chunk_size: int = 32  # teachers trained at once (vmap) and saved together
    license: str = "apache-2.0"
    image_processor: dict | None = None  # saved with image teachers; their transform is read from it
    build: bool = True  # False: the preset only describes the architecture (pools come from --teachers)

    def __post_init__(self):
        if self.regime not in ("scratch", "finetune"):
            raise WeightFormerError(f"unknown pool regime {self.regime!r}: use 'scratch' or 'finetune'")
        self.base_data = {**DEFAULT_BASE_DATA, **self.base_data}  # a preset may override some keys only
        self.finetune_log10_lr = tuple(self.finetune_log10_lr)
        self.finetune_steps = tuple(self.finetune_steps)

    @classmethod
    def from_dict(cls, d: dict) -> PoolSpec:
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**known)

    def to_dict(self) -> dict:
        return json.loads(json.dumps(asdict(self)))  # tuples as lists, so saved and fresh specs compare equal


# What each dataset's fine-tune pools pretrain their base on (see `finetune_source`).
SOURCE_TASKS = {
    "mnist1d": "a shifted MNIST-1D",
    "mnist5k": "scikit-learn's 8x8 digits upsampled to 28x28",
}


def source_task(dataset: str) -> str:
    """What a fine-tune pool of `dataset` pretrained its base on, in words (for records, cards and reports)."""
    return SOURCE_TASKS.get(dataset, "a source task given by the caller")


def finetune_source(spec: PoolSpec, dataset: str, transform: Transform) -> tuple[torch.Tensor, torch.Tensor]:
    """`(inputs, labels)` of the task a fine-tune pool's base is pretrained on, through the teachers'
    `transform`: MNIST-1D drawn with `spec.base_data` for MNIST-1D pools, scikit-learn's digits for MNIST-5k."""
    if dataset == "mnist1d":
        return mnist1d_tensors(**spec.base_data)
    if dataset == "mnist5k":
        return tensors(task_splits(digits_splits(), transform)["train"])
    raise TeacherSourceError(
        f"fine-tune pools have a source task for {' and '.join(SOURCE_TASKS)} only, not for {dataset!r}"
    )


def teacher_recipes(spec: PoolSpec) -> list[dict]:
    """Per teacher: name, initialisation seed, data-order seed, peak learning rate and steps (a pure function of
    the spec, so a resumed build trains the teachers it lacks exactly as a fresh build would)."""
    width = max(2, len(str(spec.num_teachers - 1)))
    rng = random.Random(f"pool-recipes-{spec.seed}")
    out = []
    for i in range(spec.num_teachers):
        seed = spec.seed + i
        recipe = {"name": f"teacher-{i:0{width}d}", "seed": seed, "data_seed": 10_000 + seed}
        if spec.regime == "finetune":
            low, high = spec.finetune_log10_lr
            recipe.update(learning_rate=10 ** rng.uniform(low, high), steps=rng.choice(spec.finetune_steps))
        else:
            recipe.update(learning_rate=spec.learning_rate, steps=spec.train_steps)
        recipe["init_seed"] = spec.seed if spec.shared_init else seed
        out.append(recipe)
    return out


def default_pool_dir(name: str) -> Path:
    """`cache_root()/pools/<name>` (`$WEIGHTFORMER_HF_CACHE` overrides the root)."""
    return cache_root() / "pools" / name


def _read_pool_record(path: Path) -> dict:
    """A pool's JSON record (`pool.json`, `build.json`), or a clear error when it is not readable JSON."""
    try:
        record = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise TeacherSourceError(
            f"pool folder {str(path.parent)!r}: {path.name} is corrupt ({err}); delete the folder to rebuild the "
            "pool, or restore the file"
        ) from None
    if not isinstance(record, dict):
        raise TeacherSourceError(f"pool folder {str(path.parent)!r}: {path.name} is not a pool record")
    return record


def teacher_paths(pool_dir: str | Path) -> list[Path]:
    """The teacher folders of a pool directory: those listed in its manifest, else every model folder.

    A folder that holds weights but no `config.json` is a broken teacher, not something to skip: it raises."""
    pool_dir = Path(pool_dir)
    manifest = pool_dir / MANIFEST
    if manifest.exists():
        record = _read_pool_record(manifest)
        if not isinstance(record.get("teachers"), list):
            raise TeacherSourceError(f"pool folder {str(pool_dir)!r}: {MANIFEST} lists no teachers")
        return [pool_dir / name for name in record["teachers"]]
    if not pool_dir.is_dir():
        return []
    # hidden folders: a build's half-written teachers (`_write_atomic`), or a tool's (.git, .ipynb_checkpoints)
    folders = sorted(p for p in pool_dir.iterdir() if p.is_dir() and p.name != "base" and not p.name.startswith("."))
    broken = [p.name for p in folders if not (p / "config.json").exists() and _holds_weights(p)]
    if broken:
        raise TeacherSourceError(
            f"pool folder {str(pool_dir)!r}: {', '.join(map(repr, broken))} hold weights but no config.json"
        )
    return [p for p in folders if (p / "config.json").exists()]


def _holds_weights(folder: Path) -> bool:
    return any(f.suffix in (".safetensors", ".bin", ".pth", ".pt") for f in folder.iterdir() if f.is_file())


def new_teacher(spec: PoolSpec, label_names: Sequence[str], seed: int | None = None) -> nn.Module:
    """An untrained teacher of the spec's architecture: `{"timm": name, **kwargs}` or
    `{"model_type": ..., **config}` (the reference MLP/CNN or any transformers image classifier). `seed`,
    when given, fixes the initialisation."""
    if seed is not None:
        torch.manual_seed(seed)
    kwargs = dict(spec.model)
    if "timm" in kwargs:
        import timm

        model = timm.create_model(kwargs.pop("timm"), num_classes=len(label_names), **kwargs)
        model.pretrained_cfg = {**model.pretrained_cfg, "label_names": list(label_names)}
        model.weightformer_model_args = dict(kwargs)  # as `family.build` records them: `TeacherSet` rebuilds it
        return model
    config = AutoConfig.for_model(
        kwargs.pop("model_type"),
        **kwargs,
        id2label=dict(enumerate(label_names)),
        label2id={n: i for i, n in enumerate(label_names)},
    )
    try:
        return AutoModelForImageClassification.from_config(config)
    except ValueError:  # the reference classifiers are registered with AutoModel only
        return AutoModel.from_config(config)


def make_image_processor(description: dict):
    """An image processor from `{"image_processor_type": "ViTImageProcessor", **kwargs}`."""
    import transformers

    kwargs = dict(description)
    return getattr(transformers, kwargs.pop("image_processor_type"))(**kwargs)


@torch.no_grad()
def teacher_accuracy(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    preds = torch.cat([logits_of(model(inputs[i : i + 4096])).argmax(-1) for i in range(0, len(inputs), 4096)])
    return (preds == labels).float().mean().item()


def _architecture_name(spec: PoolSpec) -> str:
    return spec.model.get("timm") or spec.model["model_type"]


def write_model_card(folder: Path, name: str, spec: PoolSpec, dataset: str, record: dict) -> None:
    """A README.md with front matter (license, library, tags) and the training recipe."""
    from huggingface_hub import ModelCard, ModelCardData

    data = ModelCardData(
        license=spec.license,
        library_name="timm" if "timm" in spec.model else "transformers",
        pipeline_tag="image-classification" if "image" in dataset or "mnist5k" in dataset else None,
        tags=["weightformer", "weightformer-teacher", dataset],
    )
    if spec.regime == "finetune":
        origin = f"fine-tuned from the pool's `base/` (pretrained {spec.base_steps} steps on {source_task(dataset)})"
    else:
        origin = f"trained from seed {record['init_seed']}" + (" (shared initialisation)" if spec.shared_init else "")
    body = (
        f"# {name}\n\nA teacher of a WeightFormer pool: `{_architecture_name(spec)}` on {dataset}, {origin}.\n\n"
        f"- recipe: AdamW peak lr {record['learning_rate']:.3g}, weight decay {spec.weight_decay}, one-cycle, "
        f"{record['steps']} steps of batch {spec.batch_size}, data order seed {record['data_seed']}\n"
        f"- test accuracy: {record['test_accuracy']:.4f}\n- architecture: `{json.dumps(spec.model)}`\n"
    )
    ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}").save(folder / "README.md")


def save_teacher(model: nn.Module, folder: Path, spec: PoolSpec, timm_data_config: dict | None = None) -> None:
    """Write one model as a Hub-format repo folder: timm `save_for_hf` or transformers `save_pretrained`."""
    folder.mkdir(parents=True, exist_ok=True)
    if "timm" in spec.model:
        import timm

        label_names = model.pretrained_cfg.get("label_names")
        timm.models.save_for_hf(
            model, str(folder), model_config={"label_names": label_names}, data_config=timm_data_config,
            safe_serialization=True,
        )  # fmt: skip
    else:
        model.save_pretrained(folder)
    if spec.image_processor:
        make_image_processor(spec.image_processor).save_pretrained(folder)


def _write_atomic(folder: Path, write) -> None:
    """`write(tmp)` into a folder beside `folder`, then rename: a kill never leaves half a teacher."""
    tmp = folder.with_name(f".{folder.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)


def expand_sources(specs: Sequence[str | Path]) -> list[str]:
    """`--teachers` entries → teacher sources: a pool folder expands to its teachers; model folders and
    Hub ids stay. Raises `TeacherSourceError` when nothing is left (an empty pool)."""
    sources: list[str] = []
    for spec in specs:
        path = Path(spec)
        if path.is_dir() and not (path / "config.json").exists():
            found = teacher_paths(path)
            if not found:
                raise TeacherSourceError(f"the pool is empty: {str(path)!r} holds no teacher folder (config.json)")
            sources += [str(p) for p in found]
        else:
            sources.append(str(spec))
    if not sources:
        raise TeacherSourceError("the pool is empty: --teachers names no teacher")
    return sources


def build_pool(
    spec: PoolSpec,
    train: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor],
    label_names: Sequence[str],
    pool_dir: str | Path,
    dataset: str = "mnist1d",
    show_progress: bool = True,
    source: tuple[torch.Tensor, torch.Tensor] | None = None,
    timm_data_config: dict | None = None,
) -> list[Path]:
    """Train the spec's teachers (and, for fine-tune pools, the base on `source`) and save each as a Hub-format
    repo under `pool_dir`. Teachers already saved by an interrupted build of the same spec are kept."""
    pool_dir = Path(pool_dir)
    pool_dir.mkdir(parents=True, exist_ok=True)
    progress_file = pool_dir / PROGRESS
    wanted = {"spec": spec.to_dict(), "dataset": dataset}
    ours = progress_file.exists() or (pool_dir / MANIFEST).exists()
    if not ours and any(pool_dir.iterdir()):  # a user's folder: building here would delete what it holds
        raise TeacherSourceError(
            f"pool folder {str(pool_dir)!r} is not empty and holds no pool this library built ({PROGRESS} or "
            f"{MANIFEST}): pass an empty or new --pool_dir (nothing was changed), or --teachers to train on its "
            "teachers"
        )
    (pool_dir / MANIFEST).unlink(missing_ok=True)
    if not progress_file.exists() or _read_pool_record(progress_file) != wanted:
        for old in pool_dir.iterdir():  # another spec's teachers: not reusable
            shutil.rmtree(old) if old.is_dir() else old.unlink()
        progress_file.write_text(json.dumps(wanted, indent=2))
    recipes = teacher_recipes(spec)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one model at a time (the base): see the module docstring
    try:
        base = _base_model(spec, label_names, pool_dir, source, dataset, timm_data_config, show_progress)
        todo = [r for r in recipes if not (pool_dir / r["name"] / RECORD).exists()]
        chunks = []
        for steps in sorted({r["steps"] for r in todo}):
            same = [r for r in todo if r["steps"] == steps]
            chunks += [same[i : i + spec.chunk_size] for i in range(0, len(same), spec.chunk_size)]
        looped = has_batchnorm(new_teacher(spec, label_names))  # trained one by one (see teacher_training)
        bar = tqdm(
            total=sum(c[0]["steps"] * (len(c) if looped or len(c) == 1 else 1) for c in chunks),
            desc=f"training {len(todo)} of {len(recipes)} teachers ({len(chunks)} chunks)",
            disable=not show_progress or not todo,
            unit="step",
        )
        for chunk in chunks:
            torch.set_num_threads(threads if len(chunk) > 1 and not looped else 1)  # see the module docstring
            _train_chunk(spec, chunk, base, train, test, label_names, pool_dir, dataset, timm_data_config, bar)
        bar.close()
    finally:
        torch.set_num_threads(threads)
    records = [json.loads((pool_dir / r["name"] / RECORD).read_text()) for r in recipes]
    manifest = {
        "spec": spec.to_dict(),
        "dataset": dataset,
        "teachers": [r["name"] for r in recipes],
        "test_accuracy": [r["test_accuracy"] for r in records],
        "recipes": records,
        "base": "base" if base is not None else None,
        "build_seconds": sum(r["seconds"] for r in records) + (_base_record(pool_dir) or {}).get("seconds", 0.0),
    }
    tmp = pool_dir / f"{MANIFEST}.tmp{os.getpid()}"
    tmp.write_text(json.dumps(manifest, indent=2))
    os.replace(tmp, pool_dir / MANIFEST)
    return [pool_dir / r["name"] for r in recipes]


def _base_record(pool_dir: Path) -> dict | None:
    path = pool_dir / "base" / RECORD
    return json.loads(path.read_text()) if path.exists() else None


def _base_model(spec, label_names, pool_dir, source, dataset, timm_data_config, show_progress) -> nn.Module | None:
    """The fine-tune regime's pretrained base: loaded when an earlier build saved it, else trained on `source`."""
    if spec.regime != "finetune":
        return None
    folder = pool_dir / "base"
    model = new_teacher(spec, label_names, seed=spec.seed + 999_999)
    if _base_record(pool_dir) is not None:
        from safetensors.torch import load_file

        model.load_state_dict(load_file(str(folder / "model.safetensors")))
        return model.eval()
    if source is None:
        raise WeightFormerError("a fine-tune pool needs source data to pretrain its base on")
    start = time.perf_counter()
    bar = tqdm(total=spec.base_steps, desc="pretraining the base", disable=not show_progress, unit="step")
    train_models([model], *source, spec.base_steps, batch_size=spec.batch_size, lr=spec.learning_rate,
                 weight_decay=spec.weight_decay, data_seeds=[spec.seed + 999_999], progress=bar)  # fmt: skip
    bar.close()
    described = spec.base_data if dataset == "mnist1d" else source_task(dataset)
    record = {"steps": spec.base_steps, "learning_rate": spec.learning_rate, "source": described,
              "seconds": time.perf_counter() - start}  # fmt: skip

    def write(tmp: Path) -> None:
        with no_progress_bars():
            save_teacher(model, tmp, spec, timm_data_config)
        (tmp / RECORD).write_text(json.dumps(record, indent=2))

    _write_atomic(folder, write)
    return model


def _train_chunk(spec, recipes, base, train, test, label_names, pool_dir, dataset, timm_data_config, bar):
    """Train `recipes` (same length) together and save each teacher as soon as the chunk is done."""
    steps = recipes[0]["steps"]
    models = [copy.deepcopy(base) if base is not None else new_teacher(spec, label_names, seed=r["init_seed"])
              for r in recipes]  # fmt: skip
    start = time.perf_counter()
    train_models(models, *train, steps, batch_size=spec.batch_size, lr=[r["learning_rate"] for r in recipes],
                 weight_decay=spec.weight_decay, data_seeds=[r["data_seed"] for r in recipes],
                 progress=bar)  # fmt: skip
    seconds = (time.perf_counter() - start) / len(models)
    for model, recipe in zip(models, recipes):
        record = {**recipe, "test_accuracy": teacher_accuracy(model, *test), "seconds": seconds}

        def write(tmp: Path, model=model, record=record) -> None:
            with no_progress_bars():  # one bar for the build, not one per saved file
                save_teacher(model, tmp, spec, timm_data_config)
            write_model_card(tmp, record["name"], spec, dataset, record)
            (tmp / RECORD).write_text(json.dumps(record, indent=2))

        _write_atomic(pool_dir / recipe["name"], write)
        bar.set_postfix(last_acc=f"{record['test_accuracy']:.3f}")


def pool_is_built(spec: PoolSpec, pool_dir: str | Path, dataset: str) -> bool:
    manifest = Path(pool_dir) / MANIFEST
    if not manifest.exists():
        return False
    saved = _read_pool_record(manifest)
    return saved.get("spec") == spec.to_dict() and saved.get("dataset") == dataset


def load_pool(sources: Sequence[str | Path]) -> TeacherSet:
    """A validated `TeacherSet` from teacher folders and/or Hub ids (one architecture, one label set), each
    teacher once: a teacher given twice could train the generator and sit in a held-out set."""
    teachers = load_teachers([str(s) for s in sources])
    if repeated := teachers.repeated():
        raise TeacherSourceError(f"{repeated[0]}: give each teacher once")
    return teachers


def resolve_pool(
    teachers: Sequence[str] | None,
    preset: dict,
    preset_name: str,
    raw: DatasetDict,
    dataset: str,
    pool_dir: str | Path | None = None,
    shared_init: bool = False,
    may_build: bool = True,
) -> TeacherSet:
    """The training script's pool: `--teachers` if given, else the preset's pool, built first when missing
    (only where `may_build`, i.e. on the main process; other ranks wait and then read it)."""
    if teachers:
        return load_pool(expand_sources(teachers))
    spec = PoolSpec.from_dict({**preset.get("pool", {}), "shared_init": shared_init})
    if "pool" not in preset or not spec.build:
        raise TeacherSourceError(f"preset {preset_name!r} builds no pool: pass --teachers")
    pool_dir = pool_dir or default_pool_dir(preset_name + ("-shared-init" if shared_init else ""))
    if may_build and not pool_is_built(spec, pool_dir, dataset):
        if spec.image_processor:
            transform = image_transform({"preprocessor_config": spec.image_processor})
        else:
            transform = signal_transform()
        task = task_splits(raw, transform)
        source = finetune_source(spec, dataset, transform) if spec.regime == "finetune" else None
        build_pool(
            spec,
            tensors(task["train"]),
            tensors(task["test"]),
            label_names_of(raw["train"]),
            pool_dir,
            dataset,
            source=source,
        )
    return load_pool(teacher_paths(pool_dir))
