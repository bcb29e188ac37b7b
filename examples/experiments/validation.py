"""The validation protocol the design experiments share: a benchmark pool's last training teachers, cut into
disjoint sets of K (anchor first); the benchmark's own held-out teachers are never touched."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarking import methods, plans  # noqa: E402

from weightformer_hf.hub import no_progress_bars  # noqa: E402


def load_run(pool: str) -> methods.PoolRun:
    """The pool (built if missing) with its data and cached logits, as `methods.PoolRun`."""
    plan = next(x for x in plans.full_plans() if x.name == pool)
    with no_progress_bars():
        teachers, data, _, base = plans.load(plan)
    return methods.PoolRun(plan, teachers, data, base, argparse.Namespace(temperature=4.0, alpha=0.9, seed=0))


def validation_sets(plan: plans.PoolPlan, num_val_teachers: int, k: int) -> list[list[int]]:
    """Disjoint sets of `k` of the last `num_val_teachers` training teachers."""
    val = list(range(plan.num_train - num_val_teachers, plan.num_train))
    return [val[i * k : (i + 1) * k] for i in range(len(val) // k)]


def with_fresh_meta(data, samples: int):
    """`data` with its meta split replaced by a fresh MNIST-1D draw of `samples` labelled samples (seed 4242,
    which no teacher trained on): the `--meta_samples` protocol of the design experiments."""
    import dataclasses

    from weightformer_hf.data import mnist1d_tensors

    return dataclasses.replace(data, **dict(zip(("meta_x", "meta_y"), mnist1d_tensors(samples, 4242))))
