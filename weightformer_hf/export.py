"""Write a generated student as a real timm or transformers repo folder, with its model card.

- **timm format**: `timm.models.save_for_hf(..., safe_serialization=True)` (`config.json` with
  `architecture`, `num_classes`, `label_names`, `model_args`, `pretrained_cfg`; `model.safetensors`), then
  `model_args["num_classes"]` is deleted so transformers' timm wrapper can read the repo too.
- **transformers format**: `save_pretrained` (config with `id2label`/`label2id`, `model.safetensors`) and,
  for image families, an image processor (`preprocessor_config.json`). A timm student is written in this
  format through transformers' `TimmWrapperForImageClassification`; a transformers student cannot become a
  timm repo.
- **README.md**: a `huggingface_hub.ModelCard` whose `base_model` lists the Hub teachers, with
  `base_model_relation: merge`, the license derived from the teachers and, when given, a `model-index`.
- **weightformer_config.json**: the provenance (generator, anchor, teachers with shas or hashes).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import uuid
import warnings
from collections.abc import Mapping
from pathlib import Path

from torch import nn

from .errors import UnsupportedArchitectureError
from .families import Family, family_of
from .teachers import TeacherSet

logger = logging.getLogger(__name__)

PAPER_URL = "https://arxiv.org/abs/2210.01973"
PROVENANCE_FILE = "weightformer_config.json"
_IMAGE_FAMILIES = {"timm_resnet", "timm_vgg", "timm_vit", "hf_resnet", "hf_vit"}


def save_student(
    student: nn.Module,
    out_dir: str | Path,
    format: str | None = None,
    teachers: TeacherSet | None = None,
    generator=None,
    metrics: Mapping[str, float] | None = None,
    *,
    anchor: int | None = None,
    dataset: str | None = None,
    dataset_split: str = "test",
    model_name: str | None = None,
    anchor_choice=None,
    finetuning=None,
) -> Path:
    """Save `student` to `out_dir` as a loadable repo folder with a model card; return the folder.

    Args:
        student: the generated model (a timm or transformers classifier of a supported family).
        out_dir: folder to write (created; existing files of the same names are replaced).
        format: "timm" or "transformers"; defaults to the student's (the teachers') own format.
        teachers: the `TeacherSet` it was generated from: fills `base_model`, license and provenance.
        generator: the `WeightFormerModel` used (or a string naming it); `None` for none.
        metrics: measured metrics (name → value) for the card's `model-index`.
        anchor: index of the anchor teacher, for the card.
        dataset: the dataset the metrics were measured on (Hub id or name).
        dataset_split: its split.
        model_name: name in the card (default: the folder name).
        anchor_choice: the `scoring.AnchorChoice` that picked the anchor on data, if one did.
        finetuning: the `distill.Finetuning` that distilled the student on data after generation, if any.

    Raises:
        UnsupportedArchitectureError: an unknown format, or a transformers student asked for as timm.
    """
    final = Path(out_dir)
    family = teachers.family if teachers is not None else family_of(student)
    fmt = format or family.format
    if fmt not in ("timm", "transformers"):
        raise UnsupportedArchitectureError(f"unknown student format {fmt!r}: use 'timm' or 'transformers'")
    # Written whole beside the folder first, so an interrupted write leaves `final` as it was.
    final.parent.mkdir(parents=True, exist_ok=True)
    out = _staging_folder(final)
    try:
        _write_student(student, out, fmt, family, teachers, generator, metrics, anchor, dataset,
                       dataset_split, model_name or final.resolve().name, anchor_choice, finetuning)  # fmt: skip
        _move_into(out, final)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return final


def _staging_folder(final: Path) -> Path:
    """A new empty folder beside `final`. Made with `mkdir`, so it has the umask's mode that `final` would
    have had (`tempfile.mkdtemp` makes 0700 folders), since a new student is this folder renamed."""
    for _ in range(100):
        staged = final.parent / f".{final.name}.{uuid.uuid4().hex[:12]}"
        try:
            staged.mkdir()
            return staged
        except FileExistsError:
            continue
    raise FileExistsError(f"could not make a staging folder beside {str(final)!r}")


def _move_into(staged: Path, final: Path) -> None:
    """Put the staged files in `final`.

    A new or empty `final` is the staged folder renamed: one step, so readers see no student or the whole
    one. Otherwise the files move one by one, the card and the provenance record last. Each file is whole,
    but a kill during those moves (milliseconds) leaves the two students' files side by side; the old
    provenance record then still names the old student. A previous student's weight files that this save did
    not write (shards of a larger earlier student) are removed first, so loaders cannot mix the two."""
    if not final.exists() or (final.is_dir() and not any(final.iterdir())):
        try:
            os.replace(staged, final)
            return
        except OSError:  # a platform that cannot rename onto an empty folder: move file by file
            final.mkdir(parents=True, exist_ok=True)
    new = {p.relative_to(staged) for p in staged.rglob("*") if p.is_file()}
    if (final / PROVENANCE_FILE).is_file():
        for old in final.glob("*.safetensors*"):
            if old.relative_to(final) not in new:
                old.unlink()
    last = {Path("README.md"), Path(PROVENANCE_FILE)}
    for rel in sorted(new, key=lambda rel: (rel in last, rel == Path(PROVENANCE_FILE), str(rel))):
        (final / rel).parent.mkdir(parents=True, exist_ok=True)
        os.replace(staged / rel, final / rel)


def _write_student(
    student, out, fmt, family, teachers, generator, metrics, anchor, dataset, dataset_split, model_name,
    anchor_choice, finetuning,
) -> None:  # fmt: skip
    labels = family.label_names(student)
    if fmt == "timm":
        if family.format != "timm":
            raise UnsupportedArchitectureError(
                f"a {family.name} student ({type(student).__name__}) is a transformers model and cannot be "
                "saved in timm format; use format='transformers'"
            )
        _save_timm(student, out, labels, teachers)
    elif family.format == "timm":
        _save_timm_as_transformers(student, out, labels, teachers)
    else:
        _save_transformers(student, out, family, teachers)
    generator_id = describe_generator(generator)
    provenance = {
        "family": family.name,
        "format": fmt,
        "generator": generator_id,
        "anchor": anchor,
        **({"anchor_choice": anchor_choice.to_dict()} if anchor_choice is not None else {}),
        **({"finetuning": finetuning.to_dict()} if finetuning is not None else {}),
        "teachers": [_teacher_record(info) for info in teachers.infos] if teachers is not None else [],
    }
    (out / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2) + "\n")
    card = student_model_card(
        teachers,
        fmt,
        family,
        generator_id,
        anchor,
        metrics,
        dataset,
        dataset_split,
        model_name,
        len(labels),
        anchor_choice,
        finetuning,
    )
    card.save(out / "README.md")


# --------------------------------------------------------------------------------------------- formats
def _save_timm(student: nn.Module, out: Path, labels: list[str], teachers: TeacherSet | None) -> None:
    from timm.models import save_for_hf

    model_args = getattr(student, "weightformer_model_args", None)
    save_for_hf(
        student,
        out,
        model_config={"label_names": list(labels)},
        model_args=dict(model_args) if model_args else None,
        data_config=_timm_data_config(teachers),
        safe_serialization=True,
    )
    config_path = out / "config.json"
    config = json.loads(config_path.read_text())
    # transformers' timm wrapper passes num_classes and **model_args to create_model: keep one of them
    config.get("model_args", {}).pop("num_classes", None)
    config_path.write_text(json.dumps(config, indent=2) + "\n")


def _timm_data_config(teachers: TeacherSet | None) -> dict | None:
    """The first teacher's preprocessing (input size, mean, std, crop, interpolation), if it has one."""
    if teachers is None:
        return None
    cfg = teachers.infos[0].extra.get("pretrained_cfg") or {}
    keys = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
    data_config = {k: cfg[k] for k in keys if cfg.get(k) is not None}
    return data_config or None


def _save_timm_as_transformers(student: nn.Module, out: Path, labels: list[str], teachers) -> None:
    """A timm student as a transformers repo, through `TimmWrapperForImageClassification`."""
    from transformers import TimmWrapperForImageClassification, TimmWrapperImageProcessor

    with tempfile.TemporaryDirectory() as tmp:
        _save_timm(student, Path(tmp), labels, teachers)
        wrapped = TimmWrapperForImageClassification.from_pretrained(tmp, dtype="float32")
        wrapped.save_pretrained(out)
        TimmWrapperImageProcessor.from_pretrained(tmp).save_pretrained(out)


def _save_transformers(student: nn.Module, out: Path, family: Family, teachers: TeacherSet | None) -> None:
    student.save_pretrained(out)
    if family.name not in _IMAGE_FAMILIES:
        return  # the MNIST-1D reference models read 1-D signals: there is no image processor to save
    teacher_processor = next(
        (
            info.extra["preprocessor_config"]
            for info in (teachers.infos if teachers else [])
            if info.extra.get("preprocessor_config")
        ),
        None,
    )
    if teacher_processor is not None:  # the teachers' own preprocessing, verbatim
        (out / "preprocessor_config.json").write_text(json.dumps(teacher_processor, indent=2) + "\n")
        return
    default_image_processor(student, family).save_pretrained(out)


def default_image_processor(student: nn.Module, family: Family):
    """A PIL image processor for teachers that shipped none: resize to the model's size, scale to [-1, 1]."""
    from transformers import ConvNextImageProcessorPil, ViTImageProcessorPil

    config = student.config
    channels = int(getattr(config, "num_channels", 3))
    mean, std = [0.5] * channels, [0.5] * channels
    if family.name == "hf_vit":
        size = int(config.image_size)
        return ViTImageProcessorPil(size={"height": size, "width": size}, image_mean=mean, image_std=std)
    # ResNet configs carry no input size; 224 is the size of the reference ImageNet ResNets
    return ConvNextImageProcessorPil(
        size={"shortest_edge": 224}, crop_pct=1.0, image_mean=mean, image_std=std
    )


# ---------------------------------------------------------------------------------------- provenance
UNTRAINED = "untrained"


def describe_generator(generator) -> str | None:
    """How the card names the generator: `org/name@sha`, a folder, "untrained", or None (not recorded)."""
    if generator is None or isinstance(generator, str):
        return generator
    source = getattr(generator, "weightformer_source", None)
    if source:
        return str(source)
    return getattr(generator, "name_or_path", "") or UNTRAINED


def _teacher_record(info) -> dict:
    record = {"name": info.name, "source": info.source}
    for key in ("repo_id", "revision", "content_hash", "license"):
        if getattr(info, key):
            record[key] = getattr(info, key)
    return record


# -------------------------------------------------------------------------------------------- card
def derive_license(teachers: TeacherSet | None) -> tuple[str | None, str | None]:
    """(license, license_name) for a student of these teachers; warns and says "other" on conflict.

    Never defaults to a permissive license: an unknown or conflicting teacher license gives "other".
    """
    if teachers is None:
        return None, None
    licenses = [info.license for info in teachers.infos]
    known = {lic for lic in licenses if lic}
    if len(known) == 1 and all(licenses):
        (license_,) = known
        if license_.startswith("other:"):
            return "other", license_.split(":", 1)[1]
        return license_, None
    if not known:
        detail = "no teacher declares a license"
    elif len(known) > 1:
        detail = "the teachers' licenses disagree: " + ", ".join(
            f"{info.name}={info.license or 'unknown'}" for info in teachers.infos
        )
    else:
        detail = "some teachers declare no license: " + ", ".join(
            info.name for info in teachers.infos if not info.license
        )
    warnings.warn(
        f"student license set to 'other' because {detail}; check the teachers' terms before publishing",
        UserWarning,
        stacklevel=4,
    )
    return "other", "derived-from-teachers"


def student_model_card(
    teachers: TeacherSet | None,
    fmt: str,
    family: Family,
    generator_id: str | None,
    anchor: int | None,
    metrics: Mapping[str, float] | None,
    dataset: str | None,
    dataset_split: str,
    model_name: str,
    num_classes: int,
    anchor_choice=None,
    finetuning=None,
):
    """The student's `ModelCard`: Hub teachers as `base_model` (merge), license, tags, model-index, text."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    infos = list(teachers.infos) if teachers is not None else []
    base_model = [info.repo_id for info in infos if info.source == "hub" and info.repo_id]
    license_, license_name = derive_license(teachers)
    image = family.name in _IMAGE_FAMILIES
    task = "image-classification" if image else None
    eval_results = None
    if metrics:
        eval_results = [
            EvalResult(
                task_type=task or "other",
                dataset_type=dataset or "unknown",
                dataset_name=dataset or "unknown",
                dataset_split=dataset_split,
                metric_type=str(name),
                metric_value=float(value),
            )
            for name, value in metrics.items()
        ]
    extra = {"base_model_relation": "merge"} if base_model else {}
    data = ModelCardData(
        model_name=model_name,
        base_model=base_model or None,
        library_name=fmt,
        license=license_,
        license_name=license_name,
        pipeline_tag=task,
        tags=[t for t in ("image-classification" if image else None, fmt, "weightformer", "merge") if t],
        datasets=[dataset] if dataset and "/" in dataset else None,
        eval_results=eval_results,
        **extra,
    )
    body = _card_body(
        infos, fmt, family, generator_id, anchor, metrics, dataset, model_name, num_classes, anchor_choice, finetuning
    )
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")


def _card_body(
    infos, fmt, family, generator_id, anchor, metrics, dataset, model_name, num_classes, anchor_choice=None,
    finetuning=None,
) -> str:  # fmt: skip
    if finetuning is not None:
        data_use = f"then distilled on the teachers' ensemble for {finetuning.steps:,} steps over labelled data"
    elif anchor_choice is None:
        data_use = "no training data was used to make it"
    else:
        data_use = "its weights come from the teachers' weights alone; labelled data only chose the anchor"
    lines = [
        f"# {model_name}",
        "",
        f"A {family.description} classifier ({num_classes} classes) generated by "
        f"[WeightFormer]({PAPER_URL}) from the weights of {len(infos) or 'its'} teacher"
        f"{'s' if len(infos) != 1 else ''} in one forward pass: {data_use}.",
        "",
        "## How it was made",
        "",
        f"- Generator: {_generator_line(generator_id)}",
        f"- Teachers (K = {len(infos)}):" if infos else "- Teachers: not recorded",
    ]
    for i, info in enumerate(infos):
        role = " (anchor)" if anchor == i else ""
        if info.source == "hub":
            lines.append(f"  {i}. `{info.repo_id}` at commit `{info.revision}`{role}")
        elif info.source == "local":
            lines.append(f"  {i}. local folder `{info.name}`, content hash `{info.content_hash}`{role}")
        else:
            lines.append(f"  {i}. in-memory model `{info.name}`{role}")
    if anchor is not None:
        anchor_name = infos[anchor].name if 0 <= anchor < len(infos) else str(anchor)
        lines.append(f"- Anchor: teacher {anchor} (`{anchor_name}`): the student keeps its channel order")
        if anchor_choice is not None:
            scores = " / ".join(f"{a:.4f}" for a in anchor_choice.accuracies)
            lines.append(f"  (the most accurate teacher on {anchor_choice.data}; accuracy by teacher: {scores})")
            if anchor_choice.student_accuracy is not None:
                lines.append(f"  The student's accuracy on the same data: {anchor_choice.student_accuracy:.4f}")
    if finetuning is not None:
        lines.append(
            f"- Fine-tuning: {finetuning.steps:,} AdamW steps (learning rate {finetuning.learning_rate:g}, batch "
            f"{finetuning.batch_size}) on {finetuning.data}: KD towards the teachers' ensemble (weight "
            f"{finetuning.alpha:g}, T = {finetuning.temperature:g}) plus cross-entropy on the labels"
        )
    lines += ["", "## Usage", ""]
    if fmt == "timm":
        lines += [
            "```python",
            "import timm",
            "",
            'model = timm.create_model("hf-hub:<this repo>", pretrained=True).eval()',
            "```",
        ]
    else:
        loader = "AutoModelForImageClassification" if family.name in _IMAGE_FAMILIES else "AutoModel"
        lines += ["```python", f"from transformers import {loader}", ""]
        if loader == "AutoModel":
            lines.insert(len(lines) - 1, "import weightformer_hf  # registers the reference model classes")
        lines += [f'model = {loader}.from_pretrained("<this repo>")', "```"]
    if metrics:
        lines += [
            "",
            "## Evaluation",
            "",
            f"Measured on {dataset or 'the evaluation data'}:",
            "",
            "| metric | value |",
            "|---|---|",
        ]
        lines += [f"| {name} | {float(value):.4f} |" for name, value in metrics.items()]
    lines += [
        "",
        "## License",
        "",
        "Derived from the teachers' model cards: a merged model falls under its inputs' terms.",
        "",
    ]
    return "\n".join(lines)


def _generator_line(generator_id: str | None) -> str:
    if generator_id is None:
        return "not recorded"
    if generator_id == UNTRAINED:
        return "an untrained WeightFormer (`--generator none`): its student equals the anchor teacher"
    if "@" in generator_id and not generator_id.startswith(("/", ".")):
        repo, sha = generator_id.split("@", 1)
        return f"`{repo}` at commit `{sha}`"
    return f"`{generator_id}`"
