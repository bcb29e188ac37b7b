"""Teacher pools: build one (reference MLPs/CNNs trained from different seeds) or load one from folders.

A built pool is a folder of Hub-format repos (`config.json`, `model.safetensors`, `README.md` with a
license) plus a `pool.json` manifest written last, so an interrupted build is redone rather than reused.

Recipe (measured-baselines.md): AdamW lr 2e-3, weight decay 1e-4, one-cycle schedule, batch 128. The
measured MNIST-1D MLPs reach 85.9 % after 12k steps and 85.0 % after 6k; the `mnist1d-*` presets use
14 teachers of 5k steps (≈ 32 epochs of 20k samples; ≈ 85 % test accuracy), ≈ 7 s per MLP on one idle
core, so the default pool is built in about 1.5 minutes and its ensemble still gains ≈ 2.5 points.
Teachers train on one thread: for these small matmuls a second thread costs more in hand-offs than it
gives, and on a shared 2-core machine it was 6× slower (3 ms vs 19 ms per step, measured).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from datasets import DatasetDict
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModel, AutoModelForImageClassification

from .data import cache_root, image_transform, label_names_of, signal_transform, task_splits, tensors
from .errors import TeacherSourceError
from .hub import load_teachers
from .teachers import TeacherSet

MANIFEST = "pool.json"


@dataclass
class PoolSpec:
    """How to build a pool: the teacher architecture (`model`: `model_type` + config kwargs) and recipe.

    `shared_init=True` gives every teacher the same initialisation and a different data order (the
    setting in which plain weight averaging works); the default draws both from each teacher's seed.
    """

    model: dict = field(default_factory=lambda: {"model_type": "wf_mlp", "hidden_sizes": [256, 256]})
    num_teachers: int = 16
    train_steps: int = 6000
    batch_size: int = 128
    learning_rate: float = 2e-3
    weight_decay: float = 1e-4
    seed: int = 0
    shared_init: bool = False
    license: str = "apache-2.0"
    image_processor: dict | None = None  # saved with image teachers; their transform is read from it
    build: bool = True  # False: the preset only describes the architecture (pools come from --teachers)

    @classmethod
    def from_dict(cls, d: dict) -> PoolSpec:
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**known)


def default_pool_dir(name: str) -> Path:
    """`cache_root()/pools/<name>` (`$WEIGHTFORMER_HF_CACHE` overrides the root)."""
    return cache_root() / "pools" / name


def teacher_paths(pool_dir: str | Path) -> list[Path]:
    """The teacher folders of a pool directory: those listed in its manifest, else every model folder."""
    pool_dir = Path(pool_dir)
    manifest = pool_dir / MANIFEST
    if manifest.exists():
        return [pool_dir / name for name in json.loads(manifest.read_text())["teachers"]]
    return sorted(p for p in pool_dir.iterdir() if (p / "config.json").exists()) if pool_dir.is_dir() else []


def new_teacher(spec: PoolSpec, label_names: Sequence[str]) -> nn.Module:
    """An untrained teacher of the spec's architecture: `{"timm": name, **kwargs}` or
    `{"model_type": ..., **config}` (the reference MLP/CNN or any transformers image classifier)."""
    kwargs = dict(spec.model)
    if "timm" in kwargs:
        import timm

        return timm.create_model(kwargs.pop("timm"), num_classes=len(label_names), **kwargs)
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


def train_teacher(
    model: nn.Module,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    spec: PoolSpec,
    data_seed: int,
    progress: tqdm | None = None,
) -> nn.Module:
    """Train `model` with the spec's recipe on in-memory tensors; `data_seed` fixes the data order."""
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.learning_rate, weight_decay=spec.weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=spec.learning_rate, total_steps=spec.train_steps
    )
    order = torch.Generator().manual_seed(data_seed)
    batches = iter(())
    for _ in range(spec.train_steps):
        idx = next(batches, None)
        if idx is None:  # a new epoch: a fresh permutation, dropping the ragged last batch
            perm = torch.randperm(len(labels), generator=order)
            batches = iter(perm[: len(perm) // spec.batch_size * spec.batch_size].view(-1, spec.batch_size))
            idx = next(batches)
        loss = F.cross_entropy(model(inputs[idx]).logits, labels[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if progress is not None:
            progress.update(1)
    return model.eval()


def make_image_processor(description: dict):
    """An image processor from `{"image_processor_type": "ViTImageProcessor", **kwargs}`."""
    import transformers

    kwargs = dict(description)
    return getattr(transformers, kwargs.pop("image_processor_type"))(**kwargs)


@torch.no_grad()
def teacher_accuracy(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor) -> float:
    preds = torch.cat([model(inputs[i : i + 4096]).logits.argmax(-1) for i in range(0, len(inputs), 4096)])
    return (preds == labels).float().mean().item()


def write_model_card(
    folder: Path, name: str, spec: PoolSpec, dataset: str, accuracy: float, seed: int
) -> None:
    """A README.md with front matter (license, library, tags) and the training recipe."""
    from huggingface_hub import ModelCard, ModelCardData

    data = ModelCardData(
        license=spec.license,
        library_name="transformers",
        pipeline_tag="image-classification" if "image" in dataset else None,
        tags=["weightformer", "weightformer-teacher", dataset],
    )
    body = (
        f"# {name}\n\nA teacher of a WeightFormer pool: `{spec.model['model_type']}` trained on {dataset} "
        f"from seed {seed}{' (shared initialisation)' if spec.shared_init else ''}.\n\n"
        f"- recipe: AdamW lr {spec.learning_rate}, weight decay {spec.weight_decay}, one-cycle, "
        f"{spec.train_steps} steps of batch {spec.batch_size}\n- test accuracy: {accuracy:.4f}\n"
        f"- architecture: `{json.dumps(spec.model)}`\n"
    )
    ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}").save(folder / "README.md")


def expand_sources(specs: Sequence[str | Path]) -> list[str]:
    """`--teachers` entries → teacher sources: a pool folder expands to its teachers; model folders and
    Hub ids stay. Raises `TeacherSourceError` when nothing is left (an empty pool)."""
    sources: list[str] = []
    for spec in specs:
        path = Path(spec)
        if path.is_dir() and not (path / "config.json").exists():
            found = teacher_paths(path)
            if not found:
                raise TeacherSourceError(
                    f"the pool is empty: {str(path)!r} holds no teacher folder (config.json)"
                )
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
) -> list[Path]:
    """Train `spec.num_teachers` teachers and save each as a Hub-format repo under `pool_dir`."""
    pool_dir = Path(pool_dir)
    pool_dir.mkdir(parents=True, exist_ok=True)
    (pool_dir / MANIFEST).unlink(missing_ok=True)
    names, accuracies = [], []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # see the module docstring
    bar = tqdm(
        total=spec.num_teachers * spec.train_steps, desc="building teacher pool", disable=not show_progress
    )
    for i in range(spec.num_teachers):
        seed = spec.seed + i
        torch.manual_seed(spec.seed if spec.shared_init else seed)
        model = train_teacher(
            new_teacher(spec, label_names), *train, spec, data_seed=10_000 + seed, progress=bar
        )
        acc = teacher_accuracy(model, *test)
        name = f"teacher-{i:02d}"
        folder = pool_dir / name
        if folder.exists():
            shutil.rmtree(folder)
        model.save_pretrained(folder)
        if spec.image_processor:
            make_image_processor(spec.image_processor).save_pretrained(folder)
        write_model_card(folder, name, spec, dataset, acc, seed)
        names.append(name)
        accuracies.append(acc)
        bar.set_postfix(last_acc=f"{acc:.3f}")
    bar.close()
    torch.set_num_threads(threads)
    manifest = {"spec": asdict(spec), "dataset": dataset, "teachers": names, "test_accuracy": accuracies}
    tmp = pool_dir / f"{MANIFEST}.tmp{os.getpid()}"
    tmp.write_text(json.dumps(manifest, indent=2))
    os.replace(tmp, pool_dir / MANIFEST)
    return [pool_dir / n for n in names]


def pool_is_built(spec: PoolSpec, pool_dir: str | Path, dataset: str) -> bool:
    manifest = Path(pool_dir) / MANIFEST
    if not manifest.exists():
        return False
    saved = json.loads(manifest.read_text())
    return saved.get("spec") == asdict(spec) and saved.get("dataset") == dataset


def load_pool(sources: Sequence[str | Path]) -> TeacherSet:
    """A validated `TeacherSet` from teacher folders and/or Hub ids (one architecture, one label set)."""
    return load_teachers([str(s) for s in sources])


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
        build_pool(
            spec,
            tensors(task["train"]),
            tensors(task["test"]),
            label_names_of(raw["train"]),
            pool_dir,
            dataset,
        )
    return load_pool(teacher_paths(pool_dir))
