"""`generate(...)`: teachers in, a saved (optionally pushed) student out; what `weightformer generate` runs.

Stages: resolve and load the teachers (validated, quietly) → load the generator and check that it serves
the teachers → generate → `save_student` → optional push. Every input problem raises a named
`WeightFormerError` before the first progress bar appears; bars are shown only on a terminal.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .distill import Finetuning, check_finetune_request
from .errors import TeacherSourceError, WeightFormerError, first_line
from .scoring import AnchorChoice
from .teachers import TeacherSet, first_non_finite


@dataclass
class GenerationResult:
    """What `generate` produced: the student, its teachers, where it was saved and the push commit."""

    student: nn.Module
    teachers: TeacherSet
    generator_id: str
    out_dir: Path | None = None
    commit: object | None = None  # huggingface_hub.CommitInfo when pushed
    anchor: int = 0
    anchor_choice: AnchorChoice | None = None  # set when anchor="best" chose it on data
    finetuning: Finetuning | None = None  # set when finetune_steps > 0 distilled the student on data


def load_generator(
    spec, teachers: TeacherSet, token: str | bool | None = None, trust_remote_code: bool = False
):
    """A `WeightFormerModel` from `spec`: "none" (untrained), a local folder, `org/name[@rev]`, or a model.

    Hub generators are pinned to the commit their revision resolves to; the model's `weightformer_source`
    records `org/name@sha` (or the folder) for the student's card. Raises if it does not serve `teachers`.
    """
    from .export import UNTRAINED
    from .modeling import WeightFormerModel

    if spec is None or (isinstance(spec, str) and spec.lower() == "none"):
        model = WeightFormerModel.for_teachers(teachers)
        model.weightformer_source = UNTRAINED
    elif isinstance(spec, WeightFormerModel):
        model = spec
    else:
        from .hub import no_progress_bars

        with no_progress_bars():  # validation comes before any bar
            model = _load_saved_generator(str(spec), token, trust_remote_code)
    model.check_teachers(teachers)
    return model


def _load_saved_generator(spec: str, token, trust_remote_code: bool):
    from .hub import _looks_like_path, hub_api, hub_call, parse_source, resolve_hub_revision
    from .modeling import WeightFormerModel

    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise TeacherSourceError(
                f"generator {spec!r}: folder has no config.json (not a saved WeightFormer)"
            )
        _check_generator_folder(path, spec)
        try:
            model = WeightFormerModel.from_pretrained(path, dtype=torch.float32, local_files_only=True)
        except (OSError, ValueError, KeyError, RuntimeError) as err:  # RuntimeError: config and weights disagree
            raise TeacherSourceError(
                f"generator {spec!r}: cannot load a WeightFormer from it ({first_line(err)})"
            ) from err
        model.weightformer_source = str(path.resolve())
        return model
    if _looks_like_path(spec):
        raise TeacherSourceError(f"generator {spec!r}: folder not found")
    repo_id, rev = parse_source(spec)
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise TeacherSourceError(
            f"generator {spec!r} is neither an existing folder nor a valid Hub repo id ({first_line(err)})"
        ) from None
    api = hub_api(token)
    sha = resolve_hub_revision(api, repo_id, rev, spec, role="generator")
    model = hub_call(
        lambda: WeightFormerModel.from_pretrained(
            repo_id, revision=sha, dtype=torch.float32, token=token, trust_remote_code=trust_remote_code
        ),
        spec,
        repo_id,
        rev,
        role="generator",
    )
    model.weightformer_source = f"{repo_id}@{sha}"
    return model


def _check_generator_folder(path: Path, spec: str) -> None:
    """A saved WeightFormer's folder: its config names the model type, and its weight files are whole."""
    import json

    from .weight_files import check_safetensors

    try:
        model_type = json.loads((path / "config.json").read_text()).get("model_type")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as err:
        raise TeacherSourceError(f"generator {spec!r}: config.json is not a JSON object ({err})") from None
    if model_type != "weightformer":
        raise TeacherSourceError(
            f"generator {spec!r}: its config.json is a {model_type or 'model without model_type'!r} config, not a "
            "WeightFormer's (a teacher or student folder given as --generator?)"
        )
    for weights in sorted(path.glob("*.safetensors")):
        check_safetensors(weights, f"generator {spec!r}")


def check_generator_weights(model, spec: str) -> None:
    """Raise `InvalidWeightsError` naming the first parameter of `model` that holds NaN or inf."""
    from .errors import InvalidWeightsError

    name = first_non_finite(model.named_parameters())
    if name is not None:
        raise InvalidWeightsError(
            f"generator {spec!r}: parameter {name!r} contains NaN or inf values; its students would too"
        )


def _check_student(student, generator_id: str) -> None:
    """A generated student with NaN or inf weights is not saved (finite teachers and generator can still give
    one: a change too large for a BatchNorm variance's `exp`)."""
    from .errors import InvalidWeightsError

    name = first_non_finite(student.state_dict().items())
    if name is not None:
        raise InvalidWeightsError(
            f"the student generated by {generator_id} has NaN or inf values in {name!r}: nothing was saved"
        )


def check_out_dir(out_dir: str | Path, teachers: TeacherSet, generator_source: str | None) -> Path:
    """The folder a student may be saved to: new, empty, or a previous student's (`weightformer_config.json`),
    never a teacher's or the generator's, and writable. Checked before anything is generated."""
    from .export import PROVENANCE_FILE

    if str(out_dir).strip() == "":
        raise WeightFormerError("the output folder is an empty path: name a folder to save the student to")
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise WeightFormerError(f"cannot save the student to {str(out)!r}: it is a file, not a folder")
    resolved = out.resolve()
    for info in teachers.infos:
        folder = info.extra.get("folder") if isinstance(getattr(info, "extra", None), dict) else None
        if info.source == "local" and folder and Path(folder).resolve() == resolved:
            raise WeightFormerError(f"the output folder {str(out)!r} is teacher {info.name!r}: it would be overwritten")
    if generator_source and Path(generator_source).resolve() == resolved:
        raise WeightFormerError(f"the output folder {str(out)!r} is the generator's folder: it would be overwritten")
    if out.is_dir() and any(out.iterdir()) and not (out / PROVENANCE_FILE).is_file():
        raise WeightFormerError(
            f"the output folder {str(out)!r} is not empty and holds no student (no {PROVENANCE_FILE}): its files "
            "could be replaced; choose a new or empty folder (nothing was written)"
        )
    existing = next((p for p in [out, *out.parents] if p.exists()), None)
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        raise WeightFormerError(f"cannot save the student to {str(out)!r}: {str(existing)!r} is not writable")
    return out


def _warn_repeated_teachers(teachers: TeacherSet) -> None:
    """Warn about a teacher given twice: allowed, as a weight, but rarely meant; `train.py`'s pools refuse it."""
    for message in teachers.repeated():
        warnings.warn(f"{message}: it counts twice in the ensemble and in the generator's teacher set", stacklevel=3)


def generate(
    teachers: Sequence[str | Path] | TeacherSet,
    generator="none",
    anchor: int | str = 0,
    out_dir: str | Path | None = None,
    format: str | None = None,
    push_to_hub: str | None = None,
    *,
    private: bool = False,
    revision: str | None = None,
    token: str | bool | None = None,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    metrics: Mapping[str, float] | None = None,
    progress: bool | None = None,
    anchor_dataset: str | None = None,
    anchor_split: str = "validation",
    anchor_num_samples: int = 1000,
    anchor_seed: int = 1,
    image_column: str = "image",
    label_column: str = "label",
    finetune_steps: int = 0,
    finetune_dataset: str | None = None,
    finetune_split: str = "train",
    finetune_num_samples: int = 10000,
    finetune_seed: int = 2,
    finetune_learning_rate: float = 3e-4,
) -> GenerationResult:
    """Generate one student from K teachers, save it as a repo folder and optionally push it.

    Args:
        teachers: Hub repo ids (`org/name[@rev]`) and/or local folders, or a loaded `TeacherSet`.
        generator: "none" (an untrained generator: the student equals the anchor), a folder or
            `org/name[@rev]` of a trained WeightFormer, or a `WeightFormerModel`.
        anchor: index of the teacher whose channel order the student keeps, or "best": the most
            accurate teacher on `anchor_dataset` (see `scoring.choose_anchor`; on the benchmark's
            fine-tunes of one base this anchor gives the best student).
        out_dir: where to save the student (required to push; a temporary folder is not used).
        format: "timm" or "transformers" (default: the teachers' format).
        push_to_hub: repo id to push the saved folder to, in one commit.
        private: make a newly created Hub repo private.
        revision: revision for Hub teachers without `@rev`.
        token: Hub token for private teachers, generator and the push (never printed or logged).
        allow_pickle, trust_remote_code: see `load_teachers`.
        metrics: measured metrics for the card.
        progress: show tqdm bars (default: only when stderr is a terminal).
        anchor_dataset, anchor_split, anchor_num_samples, anchor_seed, image_column, label_column: the
            data `anchor="best"` chooses on, as `weightformer evaluate` reads it (`anchor_seed`: mnist1d's
            generator seed, by default not `evaluate`'s, so the choice is not made on the data the student
            is then measured on).
        finetune_steps, finetune_dataset, finetune_split, finetune_num_samples, finetune_seed,
            finetune_learning_rate: after generation, distil the student on the teachers' ensemble for
            `finetune_steps` AdamW steps over this labelled data (`distill.finetune_on_data`: the
            benchmark's `kd_anchor_1k` recipe; `finetune_seed` is mnist1d's generator seed, by default
            neither evaluate's nor the anchor choice's). Worth it for teachers trained from scratch.
    """
    from .export import describe_generator, save_student
    from .hub import load_teachers, no_progress_bars

    if push_to_hub and out_dir is None:
        raise WeightFormerError("pushing needs out_dir: the student is saved there first, then uploaded")
    if format not in (None, "timm", "transformers"):
        raise WeightFormerError(f"unknown format {format!r}: use 'timm' or 'transformers'")
    _check_anchor_request(anchor, anchor_dataset)
    check_finetune_request(finetune_steps, finetune_dataset, finetune_learning_rate, finetune_num_samples)
    # 1-2. load and validate everything before any progress bar
    if isinstance(teachers, TeacherSet):
        teacher_set = teachers
    else:
        teacher_set = load_teachers(
            list(teachers),
            revision=revision,
            token=token,
            allow_pickle=allow_pickle,
            trust_remote_code=trust_remote_code,
        )
        _warn_repeated_teachers(teacher_set)
    if isinstance(anchor, int) and not 0 <= anchor < len(teacher_set):
        raise WeightFormerError(
            f"anchor {anchor} is out of range: there are {len(teacher_set)} teachers (0-based)"
        )
    if format == "timm" and teacher_set.family.format != "timm":
        raise WeightFormerError(
            f"the teachers are {teacher_set.family.name} (transformers) models; they cannot become a timm "
            "student: use --format transformers"
        )
    model = load_generator(generator, teacher_set, token=token, trust_remote_code=trust_remote_code)
    generator_id = describe_generator(model)
    check_generator_weights(model, str(generator) if isinstance(generator, (str, Path)) else generator_id)
    source = getattr(model, "weightformer_source", None)
    if out_dir is not None:
        out_dir = check_out_dir(out_dir, teacher_set, source if source and Path(source).is_dir() else None)
    choice = None
    if anchor == "best":
        from .scoring import choose_anchor

        choice = choose_anchor(
            teacher_set, anchor_dataset, anchor_split, anchor_num_samples, anchor_seed, image_column, label_column
        )
        anchor = choice.index
    finetune_data = None
    if finetune_steps:
        from .distill import load_finetune_data

        finetune_data = load_finetune_data(teacher_set, finetune_dataset, finetune_split, finetune_num_samples,
                                           finetune_seed, image_column, label_column)  # fmt: skip

    show = sys.stderr.isatty() if progress is None else progress
    stages = ["generate"] + (["finetune"] if finetune_steps else []) + (["save"] if out_dir is not None else [])
    stages += ["push"] if push_to_hub else []
    from tqdm.auto import tqdm

    bar = tqdm(total=len(stages), desc="weightformer", disable=not show, file=sys.stderr)
    try:
        bar.set_postfix_str(f"generating from {len(teacher_set)} teachers")
        student = model.generate_student(teacher_set, anchor=anchor)
        _check_student(student, generator_id)
        bar.update()
        finetuning = None
        if finetune_data is not None:
            from .distill import finetune_on_data

            bar.set_postfix_str(f"fine-tuning for {finetune_steps} steps on {finetune_dataset}")
            finetuning = finetune_on_data(student, finetune_data, finetune_steps, finetune_learning_rate, finetune_seed)
            bar.update()
        if choice is not None:  # the student that is saved: after fine-tuning, if any
            choice.measure_student(student, teacher_set.family)
        saved = None
        if out_dir is not None:
            bar.set_postfix_str(f"saving to {out_dir}")
            with no_progress_bars():  # one bar (ours), not one per library
                saved = save_student(
                    student,
                    out_dir,
                    format=format,
                    teachers=teacher_set,
                    generator=generator_id,
                    metrics=metrics,
                    anchor=anchor,
                    anchor_choice=choice,
                    finetuning=finetuning,
                )
            bar.update()
        commit = None
        if push_to_hub:
            from .push import push_student_to_hub

            bar.set_postfix_str(f"pushing to {push_to_hub}")
            with no_progress_bars():
                commit = push_student_to_hub(saved, push_to_hub, private=private, token=token)
            bar.update()
    finally:
        bar.close()
    return GenerationResult(student, teacher_set, generator_id, saved, commit, anchor, choice, finetuning)


def _check_anchor_request(anchor, anchor_dataset: str | None) -> None:
    """Reject an anchor request that cannot mean what the caller wants, before anything is loaded."""
    if isinstance(anchor, str) and anchor != "best":
        raise WeightFormerError(f"anchor {anchor!r}: give a teacher index (0-based) or 'best'")
    if anchor == "best" and not anchor_dataset:
        raise WeightFormerError(
            "anchor 'best' needs a dataset to compare the teachers on (--anchor-dataset, anchor_dataset=): "
            "held-out labelled data, not the data you will report the student's accuracy on"
        )
    if anchor != "best" and anchor_dataset:
        raise WeightFormerError(
            f"an anchor dataset was given but the anchor is teacher {anchor}: pass anchor 'best' "
            "(--anchor best) to choose the anchor on it"
        )
