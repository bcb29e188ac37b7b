"""Distil a generated student on its teachers' ensemble over labelled data: what `weightformer generate
--finetune-steps N --finetune-dataset DATA` runs after generation.

On teachers trained from scratch a few hundred KD steps gain more than the generator does (README,
Benchmark); on fine-tunes of one base the generated student is already ahead of 1,000 KD steps. This is the
benchmark's `kd_anchor_1k` recipe (AdamW at a constant rate, random minibatches of 256, KD weight 0.3 at
T = 4 plus cross-entropy on the labels), started from the student instead of the anchor.
"""

from __future__ import annotations

import math
import operator
import time
from dataclasses import dataclass

import torch

from .errors import WeightFormerError
from .teachers import TeacherSet


@dataclass
class Finetuning:
    """What `finetune_on_dataset` did, for the card and `weightformer_config.json`."""

    steps: int
    data: str  # in words: "mnist1d, seed 2, 10,000 samples"
    learning_rate: float
    alpha: float
    temperature: float
    batch_size: int
    seconds: float

    def to_dict(self) -> dict:
        return {
            "method": "KD towards the teachers' ensemble plus cross-entropy on the labels (AdamW)",
            **{k: getattr(self, k) for k in ("steps", "data", "learning_rate", "alpha", "temperature", "batch_size")},
            "seconds": round(self.seconds, 2),
        }


def check_finetune_request(steps: int, dataset: str | None, learning_rate: float, num_samples: int = 1) -> None:
    """Raise `WeightFormerError` for a fine-tuning request that cannot run, before anything is loaded."""
    for name, value, least in (("finetune_steps", steps, 0), ("finetune_num_samples", num_samples, 1)):
        try:  # numpy and torch integers too
            whole = not isinstance(value, bool) and operator.index(value) >= least
        except TypeError:
            whole = False
        if not whole:
            raise WeightFormerError(f"{name} must be a whole number ≥ {least}, got {value!r}")
    if steps and not dataset:
        raise WeightFormerError("fine-tuning needs labelled data: pass --finetune-dataset (or finetune_dataset=)")
    if dataset and not steps:
        raise WeightFormerError("--finetune-dataset is used only with --finetune-steps N (N ≥ 1)")
    if not (isinstance(learning_rate, (int, float)) and math.isfinite(learning_rate) and learning_rate > 0):
        raise WeightFormerError(f"the fine-tuning learning rate must be a positive number, got {learning_rate!r}")


def finetune_on_dataset(
    student: torch.nn.Module,
    teachers: TeacherSet,
    dataset: str,
    steps: int,
    split: str = "train",
    num_samples: int = 10000,
    seed: int = 2,
    learning_rate: float = 3e-4,
    alpha: float = 0.3,
    temperature: float = 4.0,
    batch_size: int = 256,
    image_column: str = "image",
    label_column: str = "label",
) -> Finetuning:
    """Distil `student` (changed in place, left in eval mode) on the ensemble of `teachers` over `dataset`.

    The data is read as `weightformer evaluate` reads it (`scoring.evaluation_data`; for `mnist1d`, samples
    generated with `seed`, by default neither evaluate's seed 0 nor the anchor choice's 1).
    """
    from .baselines import kd_anchor
    from .evaluation import predict_logits
    from .scoring import evaluation_data

    start = time.perf_counter()
    inputs, labels = evaluation_data(teachers, dataset, split, num_samples, seed, image_column, label_column)
    logits = []
    for i in range(len(teachers)):
        model = teachers.model(i)
        logits.append(predict_logits(lambda x, m=model: teachers.family.logits(m, x), inputs, batch_size))
    teacher_logits = torch.stack(logits)
    if not torch.isfinite(teacher_logits).all():
        bad = sorted({int(i) for i in (~torch.isfinite(teacher_logits)).flatten(1).any(1).nonzero().flatten()})
        raise WeightFormerError(
            f"teacher(s) {', '.join(teachers.infos[i].name for i in bad)} give NaN or infinite logits on {dataset}: "
            "there is no ensemble to distil towards (nothing was fine-tuned)"
        )
    with torch.enable_grad():
        kd_anchor(student, inputs, labels, teacher_logits, steps=steps, learning_rate=learning_rate,
                  batch_size=min(batch_size, len(inputs)), temperature=temperature, alpha=alpha, seed=seed)  # fmt: skip
    if not all(torch.isfinite(p).all() for p in student.parameters()):
        raise WeightFormerError(
            f"fine-tuning made the student's weights NaN or infinite (learning rate {learning_rate}): try a smaller "
            "one; nothing was saved"
        )
    where = f"seed {seed}" if dataset.lower() == "mnist1d" else f"split {split}"
    return Finetuning(steps, f"{dataset}, {where}, {len(labels):,} samples", learning_rate, alpha, temperature,
                      min(batch_size, len(inputs)), time.perf_counter() - start)  # fmt: skip
