"""`TeacherSet`: K trained models of one architecture, validated, with their provenance.

Teachers are data, not modules: a set holds one state dict per teacher (plain tensors, or a lazy mapping
that reads each tensor from safetensors on first use) plus one description of the shared architecture.
Validation happens here, once, before any generation, and every error names the teacher and the tensor.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from functools import cached_property

import torch
from torch import nn

from .errors import InvalidWeightsError, TeacherMismatchError
from .families import Family, LayerSpec, family_of, get_family
from .weight_files import is_floating, tensor_rows


@dataclass
class TeacherInfo:
    """Where a teacher came from: what the model card and the caches need to know."""

    name: str
    source: str = "memory"  # "hub", "local" or "memory"
    repo_id: str | None = None
    revision: str | None = None  # resolved commit sha for Hub teachers
    content_hash: str | None = None  # sha256 over config.json and weight files for local folders
    license: str | None = None
    extra: dict = field(default_factory=dict)

    @property
    def identity(self) -> str:
        """A stable key for caches: repo@sha, or the content hash, or the name."""
        if self.repo_id and self.revision:
            return f"{self.repo_id}@{self.revision}"
        return self.content_hash or self.name

    def to_dict(self) -> dict:
        return asdict(self)


def tensor_shape(state_dict: Mapping[str, torch.Tensor], name: str) -> tuple[int, ...]:
    """Shape of a tensor without reading it when the mapping can tell (lazy safetensors mappings can)."""
    shape_of = getattr(state_dict, "shape", None)
    return tuple(shape_of(name)) if callable(shape_of) else tuple(state_dict[name].shape)


class TeacherSet:
    """K teachers of one architecture family, validated against each other.

    Args:
        family: the architecture family (a `Family` or its registered name).
        arch: the family's JSON description of the architecture (`Family.describe`).
        label_names: the class names, in the order of the classifier rows.
        state_dicts: one mapping name → tensor per teacher.
        infos: provenance of each teacher.
        template: optional model of the architecture to build students from (built from `arch` if omitted).
    """

    def __init__(
        self,
        family: Family | str,
        arch: dict,
        label_names: Sequence[str],
        state_dicts: Sequence[Mapping[str, torch.Tensor]],
        infos: Sequence[TeacherInfo],
        template: nn.Module | None = None,
        check_finite: bool = True,
    ):
        if len(state_dicts) == 0:
            raise TeacherMismatchError("no teachers given: a TeacherSet needs at least one teacher")
        if len(state_dicts) != len(infos):
            raise TeacherMismatchError(f"{len(state_dicts)} state dicts but {len(infos)} teacher infos")
        self.family = get_family(family) if isinstance(family, str) else family
        self.arch = arch
        self.label_names = [str(n) for n in label_names]
        self.state_dicts = list(state_dicts)
        self.infos = list(infos)
        self._template = template
        # (anchor identity, teacher identity, max_iter, seed, tol) -> weight-matching permutations; shared
        # with subsets (`alignment.align_to_anchor` fills it, and a disk cache behind it)
        self.alignment_cache: dict[tuple, dict[str, torch.Tensor]] = {}
        self._validate(check_finite)

    # ----------------------------------------------------------------------------------------- building
    @classmethod
    def from_models(cls, models: Sequence[nn.Module], names: Sequence[str] | None = None) -> TeacherSet:
        """Wrap in-memory models (timm or transformers classifiers of one supported family)."""
        if len(models) == 0:
            raise TeacherMismatchError("no teachers given: pass at least one model")
        names = list(names) if names is not None else [f"teacher[{i}]" for i in range(len(models))]
        families = [family_of(m) for m in models]
        first = families[0]
        for name, fam in zip(names, families):
            if fam is not first:
                raise TeacherMismatchError(
                    f"teacher {name!r} is a {fam.name} model but teacher {names[0]!r} is a {first.name} model; "
                    "all teachers must share one architecture"
                )
        reference = models[0].state_dict()
        for name, model in zip(names[1:], models[1:]):
            _check_same_tensors(reference, model.state_dict(), names[0], name)
        archs = [first.describe(m) for m in models]
        for name, arch in zip(names, archs):
            if arch != archs[0]:
                raise TeacherMismatchError(
                    f"teacher {name!r} has architecture {_arch_name(arch)} but teacher {names[0]!r} has "
                    f"{_arch_name(archs[0])} ({_arch_diff(archs[0], arch)})"
                )
        per_teacher_labels = [first.label_names(m) for m in models]
        _check_rebuildable(first, archs[0], per_teacher_labels[0], reference, names[0])
        state_dicts = [{k: v.detach() for k, v in m.state_dict().items()} for m in models]
        state_dicts = _reorder_labels(first, models[0], names, per_teacher_labels, state_dicts)
        infos = [TeacherInfo(name=n) for n in names]
        return cls(first, archs[0], per_teacher_labels[0], state_dicts, infos, template=None)

    def subset(self, indices: Sequence[int]) -> TeacherSet:
        """The teachers at `indices`, in that order, sharing this set's template (no re-validation)."""
        new = object.__new__(TeacherSet)
        new.family, new.arch, new.label_names = self.family, self.arch, self.label_names
        new.state_dicts = [self.state_dicts[i] for i in indices]
        new.infos = [self.infos[i] for i in indices]
        new._template = self._template
        new.alignment_cache = self.alignment_cache
        new.__dict__.update({k: v for k, v in self.__dict__.items() if k in ("layers", "shapes")})
        return new

    def to(self, device: str | torch.device) -> TeacherSet:
        """A set whose tensors live on `device` (lazy tensors are read now): on an accelerator this keeps
        the per-step tokenisation (alignment permutations included) off the CPU. Caches are shared."""
        new = self.subset(range(len(self)))
        new.state_dicts = [{k: sd[k].to(device) for k in self.shapes} for sd in self.state_dicts]
        return new

    def __len__(self) -> int:
        return len(self.state_dicts)

    @property
    def names(self) -> list[str]:
        return [i.name for i in self.infos]

    def repeated(self) -> list[str]:
        """One message per teacher that is an earlier one again (the same repo revision or folder content)."""
        seen: dict[str, str] = {}
        repeats = []
        for info in self.infos:
            if info.identity in seen:
                first = seen[info.identity]
                repeats.append(f"teachers {first!r} and {info.name!r} are the same model ({info.identity})")
            seen.setdefault(info.identity, info.name)
        return repeats

    @property
    def template(self) -> nn.Module:
        """A model of the teachers' architecture used to run students functionally (`run_student` passes
        every parameter and buffer) and to read names and shapes.

        Built on the meta device and given uninitialised CPU storage (`to_empty`), which costs neither
        initialisation time nor resident memory; its own values are meaningless. Architectures with
        non-persistent buffers (which no state dict supplies) get a normal, randomly initialised model.
        """
        if self._template is None:
            model = self._build_on_meta()
            if model is None:
                model = self.family.build(self.arch, self.label_names)
            self._template = model.to_empty(device="cpu").eval() if next(model.parameters()).is_meta else model
        return self._template

    def _build_on_meta(self) -> nn.Module | None:
        """The architecture on the meta device, or None if it has state that a state dict does not hold."""
        try:
            with torch.device("meta"):
                model = self.family.build(self.arch, self.label_names)
        except Exception:  # an architecture whose construction needs real tensors
            return None
        if {n for n, _ in model.named_buffers()} - set(model.state_dict()):
            return None
        return model

    @cached_property
    def layers(self) -> tuple[list[LayerSpec], list[str]]:
        """The family's layers (forward order) and the non-floating state names, for this architecture."""
        return self.family.layers(self.template)

    @cached_property
    def shapes(self) -> dict[str, torch.Size]:
        return {k: v.shape for k, v in self.template.state_dict().items()}

    def describe(self) -> dict:
        """What a WeightFormerConfig stores about the architecture it serves."""
        return {"family": self.family.name, "arch": self.arch, "label_names": list(self.label_names)}

    def build_student(self, state_dict: Mapping[str, torch.Tensor]) -> nn.Module:
        """A fresh model of the teachers' class holding `state_dict`, in eval mode.

        The model is built on the meta device and takes the tensors of `state_dict` as its own (converted
        to the model's dtypes), so no second copy of the weights exists; tensors that belong to an
        in-memory teacher are copied, so training the model never changes a teacher.
        """
        model = self._build_on_meta()
        if model is None:
            model = self.family.build(self.arch, self.label_names)
            model.load_state_dict(dict(state_dict), strict=True)
            return model.eval()
        own = model.state_dict(keep_vars=True)
        teacher_storage = {
            t.untyped_storage().data_ptr() for sd in self.state_dicts if isinstance(sd, dict) for t in sd.values()
        }
        state = {}
        for name, value in state_dict.items():
            target = own.get(name)
            if target is not None:
                value = value.to(dtype=target.dtype)
                if value.untyped_storage().data_ptr() in teacher_storage:
                    value = value.clone()
            state[name] = value
        model.load_state_dict(state, strict=True, assign=True)
        return model.eval()

    def model(self, index: int) -> nn.Module:
        """Teacher `index` as a full model (for forward passes: ensembles, logits caches)."""
        return self.build_student({k: self.state_dicts[index][k] for k in self.shapes})

    # ------------------------------------------------------------------------------------- validation
    def _validate(self, check_finite: bool) -> None:
        expected = self.shapes
        floating = {k for k, v in self.template.state_dict().items() if v.is_floating_point()}
        for sd, info in zip(self.state_dicts, self.infos):
            missing = [k for k in expected if k not in sd]
            if missing:
                raise TeacherMismatchError(
                    f"teacher {info.name!r} lacks tensor {missing[0]!r} of the {self.family.name} architecture "
                    f"{_arch_name(self.arch)}"
                    + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                )
            extra = [k for k in sd if k not in expected]
            if extra:
                raise TeacherMismatchError(
                    f"teacher {info.name!r} has tensor {extra[0]!r}, which the {self.family.name} architecture "
                    f"{_arch_name(self.arch)} does not have"
                )
            for name, shape in expected.items():
                got = tensor_shape(sd, name)
                if name in floating and not is_floating(sd, name):
                    raise TeacherMismatchError(
                        f"tensor {name!r} of teacher {info.name!r} is not floating point, but the architecture's is: "
                        "not a trained weight"
                    )
                if got != tuple(shape):
                    raise TeacherMismatchError(
                        f"tensor {name!r} has shape {tuple(got)} in teacher {info.name!r} but {tuple(shape)} "
                        f"in the architecture of teacher {self.infos[0].name!r}"
                    )
        if check_finite:  # streamed: blocks of rows (lazy teachers read each block and drop it again)
            for sd, info in zip(self.state_dicts, self.infos):
                for name, shape in expected.items():
                    kind = _non_finite_rows(sd, name, tuple(shape))
                    if kind:
                        raise InvalidWeightsError(
                            f"teacher {info.name!r}: tensor {name!r} contains {kind} values"
                        )

    def check_matches(self, described: dict, what: str = "the generator") -> None:
        """Raise if this set's architecture or labels differ from `described` (a `describe()` dict)."""
        mine = self.describe()
        if described.get("family") != mine["family"] or described.get("arch") != mine["arch"]:
            theirs = described.get("arch") or {}
            raise TeacherMismatchError(
                f"{what} serves {described.get('family')} {_arch_name(theirs)}, but the teachers "
                f"({', '.join(self.names)}) are {mine['family']} {_arch_name(mine['arch'])}"
                + (
                    f" ({_arch_diff(theirs, mine['arch'])})"
                    if described.get("family") == mine["family"]
                    else ""
                )
            )
        if list(described.get("label_names", [])) != mine["label_names"]:
            raise TeacherMismatchError(
                f"{what} serves labels {short_labels(described.get('label_names'))}, but the teachers "
                f"({', '.join(self.names)}) have labels {short_labels(mine['label_names'])}"
            )


def _non_finite(tensor: torch.Tensor, block: int = 1 << 22) -> str | None:
    """"NaN" or "inf" if `tensor` holds such values, else None; checked in blocks of `block` elements so the
    boolean mask never costs more than a few MiB."""
    if not tensor.is_floating_point():
        return None
    flat = tensor.reshape(-1)
    for start in range(0, flat.numel(), block):
        part = flat[start : start + block]
        if not bool(torch.isfinite(part).all()):
            return "NaN" if bool(torch.isnan(part).any()) else "inf"
    return None


def first_non_finite(tensors: Iterable[tuple[str, torch.Tensor]]) -> str | None:
    """The name of the first floating tensor holding NaN or inf (a model's `named_parameters()` or
    `state_dict().items()`), else None."""
    return next((name for name, tensor in tensors if _non_finite(tensor) is not None), None)


def _non_finite_rows(
    state: Mapping[str, torch.Tensor], name: str, shape: tuple[int, ...], block: int = 1 << 20
) -> str | None:
    """`_non_finite` of `state[name]`, read in blocks of rows of about `block` elements (4 MiB of float32)."""
    if not shape or not shape[0]:
        return _non_finite(state[name])
    rows = max(1, block // max(1, math.prod(shape[1:])))
    for start in range(0, shape[0], rows):
        kind = _non_finite(tensor_rows(state, name, start, start + rows))
        if kind:
            return kind
    return None


def _arch_name(arch: dict) -> str:
    """A short human name: the timm architecture, or the transformers class."""
    return str(arch.get("architecture") or arch.get("class") or arch)


def _check_same_tensors(reference: Mapping, other: Mapping, reference_name: str, other_name: str) -> None:
    """Raise naming the first tensor that one teacher lacks or has in another shape."""
    for key, tensor in reference.items():
        if key not in other:
            raise TeacherMismatchError(
                f"teacher {other_name!r} lacks tensor {key!r} that teacher {reference_name!r} has"
            )
        if tuple(other[key].shape) != tuple(tensor.shape):
            raise TeacherMismatchError(
                f"tensor {key!r} has shape {tuple(other[key].shape)} in teacher {other_name!r} but "
                f"{tuple(tensor.shape)} in teacher {reference_name!r}"
            )
    for key in other:
        if key not in reference:
            raise TeacherMismatchError(
                f"teacher {other_name!r} has tensor {key!r} that teacher {reference_name!r} lacks"
            )


def _arch_diff(expected: dict, got: dict) -> str:
    """The first architecture settings that differ, as 'key: expected vs got'."""

    def flat(d: dict, prefix: str = "") -> dict:
        out = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out

    a, b = flat(expected), flat(got)
    diffs = [f"{k}: {a.get(k)} vs {b.get(k)}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    return "; ".join(diffs[:3])


def _check_rebuildable(family: Family, arch: dict, labels: list[str], state: Mapping, name: str) -> None:
    """Raise unless the architecture described from an in-memory model builds with that model's tensors:
    students are built from the description, and what it misses (a timm model's constructor arguments other
    than `in_chans`, which an instance does not record) would otherwise surface as a missing tensor."""
    try:
        with torch.device("meta"):
            built = {k: tuple(v.shape) for k, v in family.build(arch, labels).state_dict().items()}
    except Exception:  # an architecture that cannot be built on the meta device: validation checks it later
        return
    own = {k: tuple(v.shape) for k, v in state.items()}
    if built == own:
        return
    tensor = next(k for k in sorted(set(built) | set(own)) if built.get(k) != own.get(k))
    hint = (
        " timm models do not record their constructor arguments: set `model.weightformer_model_args` to the "
        "keyword arguments it was created with, or save it with timm.models.save_for_hf(model_args=...) and load "
        "the folder" if family.format == "timm" else ""
    )
    raise TeacherMismatchError(
        f"teacher {name!r} does not match its described architecture {_arch_name(arch)}: tensor {tensor!r} is "
        f"{own.get(tensor, 'absent')} in the model but {built.get(tensor, 'absent')} when built.{hint}"
    )


def generic_labels(labels: Sequence[str]) -> bool:
    """Whether class names say nothing about the classes (`0`, `1`, ... or transformers' `LABEL_0`, ...)."""
    n = len(labels)
    return list(labels) in ([str(i) for i in range(n)], [f"LABEL_{i}" for i in range(n)])


def short_labels(labels) -> str:
    """A label list for an error message: the first 12 and the count."""
    labels = list(labels or [])
    return str(labels if len(labels) <= 12 else [*labels[:12], "..."]) + f" ({len(labels)} classes)"


def _reorder_labels(
    family: Family,
    reference_model: nn.Module,
    names: Sequence[str],
    labels: Sequence[Sequence[str]],
    state_dicts: list[dict[str, torch.Tensor]],
) -> list[dict[str, torch.Tensor]]:
    """Bring every teacher's classifier rows into the first teacher's label order, or explain why not."""
    reference = list(labels[0])
    classifier = family.layers(reference_model)[0][-1]
    out = []
    for name, own, sd in zip(names, labels, state_dicts):
        own = list(own)
        if own == reference:  # (ImageNet's readable names repeat: "crane", "maillot"; the same order is fine)
            out.append(sd)
            continue
        repeated = sorted({label for label in [*own, *reference] if own.count(label) > 1 or reference.count(label) > 1})
        if repeated:  # rows that no name tells apart cannot be reordered to another teacher's
            raise TeacherMismatchError(
                f"teachers {names[0]!r} and {name!r} order their classes differently, and {repeated[:8]} appear "
                "more than once, so the rows cannot be matched by name"
            )
        if len(own) != len(reference):
            head = classifier.tensors[0].name
            raise TeacherMismatchError(
                f"teacher {name!r} has {len(own)} classes but teacher {names[0]!r} has {len(reference)} "
                f"(classifier tensor {head!r})"
            )
        if sorted(own) != sorted(reference):
            differing = sorted(set(own) ^ set(reference))
            raise TeacherMismatchError(
                f"teacher {name!r} has labels {short_labels(own)} but teacher {names[0]!r} has "
                f"{short_labels(reference)}; "
                f"differing labels: {differing[:8]}"
            )
        order = torch.tensor([own.index(label) for label in reference])
        sd = dict(sd)
        for t in classifier.tensors:
            sd[t.name] = sd[t.name].index_select(t.channel_axis, order)
        out.append(sd)
    return out


def as_teacher_set(teachers: TeacherSet | Sequence[nn.Module]) -> TeacherSet:
    """`teachers` itself, or in-memory models wrapped with `TeacherSet.from_models`."""
    return teachers if isinstance(teachers, TeacherSet) else TeacherSet.from_models(list(teachers))
