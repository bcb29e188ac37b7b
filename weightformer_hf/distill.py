"""Distil a generated student on its teachers' ensemble over labelled data: what `weightformer generate
--finetune-steps N --finetune-dataset DATA` runs after generation.

`load_finetune_data` reads the data and the teachers' logits before generation, so bad data stops the command
first; `finetune_on_data` distils. On teachers trained from scratch a few hundred KD steps gain more than the
generator does, and they gain more still started from the generated student (README, Benchmark); on fine-tunes
of one base the generated student is already ahead of 1,000 KD steps. The recipe is the benchmark's
`kd_anchor_1k` (AdamW at a constant rate, random minibatches of 256, KD weight 0.3 at T = 4 plus
cross-entropy on the labels), started from the student instead of the anchor.
"""

from __future__ import annotations

import math
import operator
import time
from dataclasses import dataclass

import torch

from .errors import WeightFormerError, first_line
from .teachers import TeacherSet, first_non_finite


@dataclass
class Finetuning:
    """What `finetune_on_data` did, for the card and `weightformer_config.json`."""

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


@dataclass
class FinetuneData:
    """Labelled inputs and the teachers' logits on them, read before anything is generated."""

    inputs: torch.Tensor
    labels: torch.Tensor
    teacher_logits: torch.Tensor  # (K, N, C)
    description: str  # in words, for the card
    seconds: float


def load_finetune_data(
    teachers: TeacherSet,
    dataset: str,
    split: str = "train",
    num_samples: int = 10000,
    seed: int = 2,
    image_column: str = "image",
    label_column: str = "label",
    batch_size: int = 256,
) -> FinetuneData:
    """`dataset` read as `weightformer evaluate` reads it (`scoring.evaluation_data`; for `mnist1d`, samples
    generated with `seed`, by default neither evaluate's seed 0 nor the anchor choice's 1), with every
    teacher's logits on it. A teacher whose logits are not finite is named: there is no ensemble to distil."""
    from .evaluation import check_finite_logits
    from .scoring import describe_data, evaluation_data, model_logits

    start = time.perf_counter()
    inputs, labels = evaluation_data(teachers, dataset, split, num_samples, seed, image_column, label_column)
    logits = model_logits(teachers, inputs, batch_size)
    for info, one in zip(teachers.infos, logits):
        check_finite_logits(one, info.name)
    return FinetuneData(inputs, labels, torch.stack(logits), describe_data(dataset, split, seed, len(labels)),
                        time.perf_counter() - start)  # fmt: skip


def finetune_on_data(
    student: torch.nn.Module,
    data: FinetuneData,
    steps: int,
    learning_rate: float = 3e-4,
    seed: int = 2,
    alpha: float = 0.3,
    temperature: float = 4.0,
    batch_size: int = 256,
) -> Finetuning:
    """Distil `student` (changed in place, left in eval mode) on the teachers' ensemble over `data` for `steps`
    AdamW steps, random minibatches drawn with `seed`."""
    from .baselines import kd_anchor

    start = time.perf_counter()
    batch_size = min(batch_size, len(data.inputs))
    try:
        with torch.enable_grad():
            kd_anchor(student, data.inputs, data.labels, data.teacher_logits, steps=steps, learning_rate=learning_rate,
                      batch_size=batch_size, temperature=temperature, alpha=alpha, seed=seed)  # fmt: skip
    except RuntimeError as err:
        if "overflow" not in str(err):  # only a learning rate whose AdamW step overflows float32 is the input's fault
            raise
        raise WeightFormerError(
            f"fine-tuning failed at learning rate {learning_rate} ({first_line(err)}): try a smaller one; nothing "
            "was saved"
        ) from None
    bad = first_non_finite(student.state_dict().items())
    if bad is not None:
        raise WeightFormerError(
            f"fine-tuning made the student's {bad!r} NaN or infinite (learning rate {learning_rate}): try a smaller "
            "one; nothing was saved"
        )
    seconds = data.seconds + time.perf_counter() - start
    return Finetuning(steps, data.description, learning_rate, alpha, temperature, batch_size, seconds)
