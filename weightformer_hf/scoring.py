"""Score models named by source (Hub id or folder) on a dataset: what `weightformer evaluate` runs.

Datasets: `mnist1d` (generated locally with a fixed seed, for the MLP / 1-D CNN reference families), or an
image-classification dataset (a Hub dataset id, a `save_to_disk` folder or an image folder), preprocessed
with timm's data config (timm models) or the model's image processor (transformers models).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from .errors import WeightFormerError
from .evaluation import classification_metrics, ensemble_probs, predict_logits
from .teachers import TeacherSet, generic_labels, short_labels

_SIGNAL_FAMILIES = {"mlp", "cnn1d"}
MAX_INPUT_BYTES = 4 * 2**30  # preprocessed images held at once (a 224² RGB image is 0.6 MB in float32)


class LazyImages:
    """A dataset's images, preprocessed when indexed: stands in for the `(N, *shape)` input tensor when that
    tensor would pass `MAX_INPUT_BYTES`. Indexing by a slice (scoring) or a tensor of row indices (KD
    minibatches) gives the very tensor the in-memory path would."""

    def __init__(self, ds, column: str, preprocess, shape: tuple[int, ...], dtype: torch.dtype):
        self.ds, self.column, self.preprocess = ds, column, preprocess
        self.shape, self.dtype = (len(ds), *shape), dtype

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index) -> torch.Tensor:
        rows = range(*index.indices(len(self))) if isinstance(index, slice) else torch.as_tensor(index).flatten()
        rows = [int(r) for r in rows]
        out = torch.empty((len(rows), *self.shape[1:]), dtype=self.dtype)
        for j, image in enumerate(self.ds[rows][self.column]):
            out[j] = self.preprocess(image)
        return out


class EvaluationDataError(WeightFormerError):
    """A dataset that does not fit the models or lacks a needed split or column."""


def evaluate_sources(
    sources: Sequence[str],
    dataset: str,
    split: str = "test",
    num_samples: int = 1000,
    seed: int = 0,
    image_column: str = "image",
    label_column: str = "label",
    batch_size: int = 256,
    **load_kwargs,
) -> dict[str, dict[str, float]]:
    """Accuracy, NLL and ECE of each model in `sources` and, for several, of their ensemble."""
    from .hub import load_teachers

    models = load_teachers(list(sources), **load_kwargs)
    inputs, labels = evaluation_data(models, dataset, split, num_samples, seed, image_column, label_column)
    return score(models, inputs, labels, batch_size)


@dataclass
class AnchorChoice:
    """The anchor `choose_anchor` picked: the teacher with the best accuracy on held-out data, the rule of
    the benchmark's `single_best_val` (the first of equals), with every teacher's accuracy."""

    index: int
    accuracies: list[float]
    data: str  # where they were measured, in words: "org/ds, split validation, 1,000 samples"
    student_accuracy: float | None = None  # the generated student's on the same data (`measure_student`)
    inputs: torch.Tensor | None = field(default=None, repr=False)
    labels: torch.Tensor | None = field(default=None, repr=False)
    batch_size: int = 256

    def measure_student(self, student: torch.nn.Module, family) -> float:
        """The student's accuracy on the anchor data: beside its anchor's, what the generator changed there
        (the anchor was chosen on this data, so the comparison favours the anchor, if anything)."""
        from .evaluation import accuracy

        logits = predict_logits(lambda x: family.logits(student, x), self.inputs, self.batch_size)
        self.student_accuracy = accuracy(logits, self.labels)
        return self.student_accuracy

    def to_dict(self) -> dict:
        out = {"rule": "best accuracy", "index": self.index, "accuracies": self.accuracies, "data": self.data}
        return out if self.student_accuracy is None else {**out, "student_accuracy": self.student_accuracy}


def choose_anchor(
    teachers: TeacherSet,
    dataset: str,
    split: str = "validation",
    num_samples: int = 1000,
    seed: int = 1,
    image_column: str = "image",
    label_column: str = "label",
    batch_size: int = 256,
) -> AnchorChoice:
    """The most accurate teacher on `dataset` (`split`, or for `mnist1d` samples generated with `seed`).

    On the benchmark this anchor gives the best student on fine-tunes of one base (README, Benchmark:
    `weightformer_best_val_anchor`). Choose on data you will not report the student's accuracy on: the
    default mnist1d seed (1) differs from `weightformer evaluate`'s (0)."""
    from .baselines import best_index
    from .evaluation import accuracy

    inputs, labels = evaluation_data(teachers, dataset, split, num_samples, seed, image_column, label_column)
    accuracies = [accuracy(logits, labels) for logits in model_logits(teachers, inputs, batch_size)]
    return AnchorChoice(best_index(accuracies), accuracies, describe_data(dataset, split, seed, len(labels)), None,
                        inputs, labels, batch_size)  # fmt: skip


def model_logits(models: TeacherSet, inputs: torch.Tensor, batch_size: int = 256) -> list[torch.Tensor]:
    """Each model's fp32 logits on `inputs` (a tensor or `LazyImages`), in batches."""
    out = []
    for i in range(len(models)):
        model = models.model(i)
        out.append(predict_logits(lambda x, m=model: models.family.logits(m, x), inputs, batch_size))
    return out


def score(models: TeacherSet, inputs: torch.Tensor, labels: torch.Tensor, batch_size: int = 256) -> dict:
    results, all_logits = {}, model_logits(models, inputs, batch_size)
    for info, logits in zip(models.infos, all_logits):
        results[info.name] = classification_metrics(F.softmax(logits, -1), labels)
    if len(all_logits) > 1:
        results["ensemble"] = classification_metrics(ensemble_probs(all_logits), labels)
    return results


def describe_data(dataset: str, split: str, seed: int, num_rows: int) -> str:
    """What `evaluation_data` read, in words for cards and reports: "mnist1d, seed 2, 10,000 samples"."""
    where = f"seed {seed}" if dataset.lower() == "mnist1d" else f"split {split}"
    return f"{dataset}, {where}, {num_rows:,} samples"


def evaluation_data(
    models: TeacherSet,
    dataset: str,
    split: str,
    num_samples: int,
    seed: int,
    image_column: str,
    label_column: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    if dataset.lower() == "mnist1d":
        return _mnist1d(models, num_samples, seed)
    if models.family.name in _SIGNAL_FAMILIES:
        raise EvaluationDataError(
            f"{models.family.name} models read 40-sample 1-D signals: evaluate them with --dataset mnist1d"
        )
    return _image_dataset(models, dataset, split, num_samples, image_column, label_column)


def _mnist1d(models: TeacherSet, num_samples: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    if models.family.name not in _SIGNAL_FAMILIES:
        raise EvaluationDataError(
            f"mnist1d holds 1-D signals, but the models are {models.family.name} image models; "
            "pass an image dataset"
        )
    if len(models.label_names) != 10:
        raise EvaluationDataError(f"mnist1d has 10 classes but the models have {len(models.label_names)}")
    from mnist1d.data import get_dataset_args

    from .mnist1d_draw import make_dataset

    args = get_dataset_args()
    args.num_samples, args.train_split, args.seed = 2 * num_samples, 0.5, seed
    data = make_dataset(args)  # mnist1d's draw, generated locally; its get_dataset() would try to download
    inputs = torch.as_tensor(data["x_test"], dtype=torch.float32)
    labels = torch.as_tensor(data["y_test"], dtype=torch.long)
    return inputs, labels


def _image_dataset(models, dataset, split, num_samples, image_column, label_column):
    from datasets import DatasetDict, load_dataset, load_from_disk

    path = Path(dataset).expanduser()
    try:
        if path.is_dir() and any((path / n).is_file() for n in ("dataset_dict.json", "dataset_info.json")):
            ds = load_from_disk(str(path))
            if isinstance(ds, DatasetDict):
                if split not in ds:
                    raise EvaluationDataError(
                        f"dataset {dataset!r} has no split {split!r}; splits: {list(ds)}"
                    )
                ds = ds[split]
        else:
            ds = load_dataset(str(path) if path.is_dir() else dataset, split=split)
    except (FileNotFoundError, ValueError, ConnectionError, OSError) as err:
        if isinstance(err, WeightFormerError):
            raise
        if not path.exists() and (dataset.startswith((".", "/", "~")) or dataset.count("/") > 1):
            raise EvaluationDataError(f"dataset {dataset!r}: no such folder") from None
        raise EvaluationDataError(f"cannot load dataset {dataset!r} split {split!r}: {err}") from err
    for column in (image_column, label_column):
        if column not in ds.column_names:
            raise EvaluationDataError(
                f"dataset {dataset!r} has no column {column!r}; columns: {ds.column_names} "
                "(use --image-column / --label-column)"
            )
    if len(ds) == 0:
        raise EvaluationDataError(f"dataset {dataset!r} split {split!r} has no rows")
    ds = ds.select(range(min(num_samples, len(ds))))
    preprocess = _preprocessor(models)
    example = ds[0][image_column]
    if not hasattr(example, "convert"):
        raise EvaluationDataError(
            f"column {image_column!r} of dataset {dataset!r} holds {type(example).__name__} values, not images "
            "(use --image-column)"
        )
    first = preprocess(example)
    if first.numel() * first.element_size() * len(ds) > MAX_INPUT_BYTES:  # read on access, a batch at a time
        inputs = LazyImages(ds, image_column, preprocess, tuple(first.shape), first.dtype)
    else:
        inputs = first.new_empty((len(ds), *first.shape))  # filled in place: no list of tensors beside it
        inputs[0] = first
        for i, image in enumerate(ds[image_column][1:], start=1):
            inputs[i] = preprocess(image)
    labels = torch.as_tensor(_label_ids(ds, label_column, models.label_names), dtype=torch.long)
    return inputs, labels


def _label_ids(ds, label_column: str, label_names: list[str]) -> list[int]:
    """Dataset labels as model class indices: by name when the dataset's class names are the model's."""
    feature = ds.features[label_column]
    values = ds[label_column]
    names = getattr(feature, "names", None)
    if names and set(names) == set(label_names):
        return [label_names.index(names[v]) for v in values]
    n = len(label_names)
    if names and not generic_labels(label_names):  # other names: raw ids would compare unrelated classes
        raise EvaluationDataError(
            f"the dataset's classes {short_labels(names)} are not the model's {short_labels(label_names)}: pass a "
            "dataset with the model's classes"
        )
    ids = [int(v) for v in values]
    if ids and not 0 <= min(ids) <= max(ids) < n:
        raise EvaluationDataError(f"the dataset has label ids {min(ids)}..{max(ids)}, but the model has {n} classes")
    return ids


def _match_input_channels(config: dict, model: torch.nn.Module) -> dict:
    """timm keeps the architecture's default (3-channel) `pretrained_cfg` for models built with another
    `in_chans`: take the channel count from the first convolution and average mean/std over channels, as
    timm itself does when it adapts pretrained weights to fewer channels."""
    conv = next((m for m in model.modules() if isinstance(m, torch.nn.Conv2d)), None)
    channels = conv.in_channels if conv is not None else config["input_size"][0]
    if channels == config["input_size"][0]:
        return config
    mean = sum(config["mean"]) / len(config["mean"])
    std = sum(config["std"]) / len(config["std"])
    return {**config, "input_size": (channels, *config["input_size"][1:]), "mean": (mean,) * channels,
            "std": (std,) * channels}  # fmt: skip


def _preprocessor(models: TeacherSet):
    model = models.model(0)
    if models.family.format == "timm":
        from timm.data import create_transform, resolve_data_config

        config = _match_input_channels(resolve_data_config({}, model=model), model)
        transform = create_transform(**config)
        mode = "L" if config["input_size"][0] == 1 else "RGB"
        return lambda image: transform(image.convert(mode))
    from transformers import AutoImageProcessor

    folder = models.infos[0].extra.get("folder")
    if not folder or not (Path(folder) / "preprocessor_config.json").is_file():
        raise EvaluationDataError(
            f"model {models.infos[0].name!r} has no preprocessor_config.json: cannot preprocess images for it"
        )
    processor = AutoImageProcessor.from_pretrained(folder)
    channels = int(getattr(model.config, "num_channels", 3))
    mode = "L" if channels == 1 else "RGB"
    return lambda image: processor(image.convert(mode), return_tensors="pt")["pixel_values"][0]
