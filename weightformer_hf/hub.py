"""Load teachers from Hub repos (`org/name`, `org/name@rev`) and local folders into a `TeacherSet`.

Loading runs in two passes so that bad input fails fast and by name:

1. **Prepare** every source: resolve Hub revisions to commit shas (once), fetch only `config.json` (and
   `README.md` for the license, `preprocessor_config.json` for export), detect the format (timm:
   `architecture`; transformers: `model_type`), build the architecture on the meta device to find its
   family, and compare architectures and label sets across teachers. No weights are downloaded yet.
2. **Read** the weights: timm safetensors lazily (disk names are memory names), transformers teachers one
   at a time with `from_pretrained(dtype=torch.float32)` (v5 renames tensors between disk and memory),
   keeping only their state dicts. `TeacherSet` then checks tensor names, shapes and finiteness.

Every error is a `WeightFormerError` subclass whose message names the teacher (as the user wrote it) and
the tensor or file at fault. No progress bar is shown while loading.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .allocator import release_free_memory
from .errors import (
    TeacherMismatchError,
    TeacherSourceError,
    UnsupportedArchitectureError,
    WeightFormerError,
    first_line,
)
from .families import FAMILIES, Family, family_of, supported_families
from .teachers import TeacherInfo, TeacherSet, _reorder_labels
from .weight_files import (
    LazySafetensorsStateDict,
    OverlayStateDict,
    WeightFiles,
    check_safetensors,
    choose_weight_files,
    content_hash,
    load_pickle_state_dict,
)

LIBRARY_NAME = "weightformer"
_OPTIONAL_FILES = ("README.md", "preprocessor_config.json")
_COMMIT_SHA = re.compile(r"^[0-9a-f]{40}$")


@dataclass
class _Source:
    """One teacher source while it is being prepared and read."""

    name: str  # as the user wrote it: messages name this
    kind: str  # "hub" or "local"
    folder: Path
    repo_id: str | None = None
    requested_revision: str | None = None
    sha: str | None = None
    available: list[str] = field(default_factory=list)
    config: dict = field(default_factory=dict)
    format: str = ""
    family: Family | None = None
    arch: dict = field(default_factory=dict)
    labels: list[str] = field(default_factory=list)
    meta_model: nn.Module | None = None
    weights: WeightFiles | None = None
    license: str | None = None
    extra: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------------------- public API
def load_teachers(
    sources: Sequence[str | Path],
    revision: str | None = None,
    token: str | bool | None = None,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> TeacherSet:
    """Load K teachers of one architecture from Hub repos and/or local folders.

    Args:
        sources: Hub repo ids (`org/name`, or `org/name@rev` with a branch, tag or commit sha) or paths of
            local folders written by `save_pretrained` (transformers) or `timm.models.save_for_hf` (timm).
        revision: revision for Hub sources without `@rev` (default: the repo's main branch).
        token: Hub token for private repos (never printed or logged).
        allow_pickle: accept repos that only have pickle weights (`pytorch_model.bin`); they are then read
            with `torch.load(weights_only=True)`. Off by default: prefer safetensors.
        trust_remote_code: allow transformers repos with custom code (`auto_map`) to run it. Pin a commit.
        device, dtype: where and in which floating dtype the teachers' tensors are delivered
            (default: CPU; the stored dtype for timm, float32 for transformers).

    Returns:
        A validated `TeacherSet` whose `infos` record each teacher's repo and commit sha (Hub) or content
        hash (local folder) and license.

    Raises:
        TeacherSourceError: a missing folder, repo, revision or file, or pickle-only weights.
        UnsupportedArchitectureError: an architecture no family supports.
        TeacherMismatchError: different architectures, labels, tensor names or shapes.
        InvalidWeightsError: corrupt or truncated weight files, NaN or inf weights.
    """
    if isinstance(sources, (str, Path)):
        sources = [sources]
    if len(sources) == 0:
        raise TeacherSourceError("no teachers given: pass at least one Hub repo id or local folder")
    with no_progress_bars():
        api = hub_api(token) if any(_is_hub_spec(s) for s in sources) else None
        prepared = [_prepare(str(s), revision, token, api, trust_remote_code, allow_pickle) for s in sources]
        _check_compatible(prepared)
        state_dicts = [
            _read_weights(src, token, allow_pickle, trust_remote_code, device, dtype) for src in prepared
        ]
        state_dicts = _align_label_order(prepared, state_dicts)
        first = prepared[0]
        infos = [_info(src) for src in prepared]
    teachers = TeacherSet(first.family, first.arch, first.labels, state_dicts, infos)
    # the validation reads' buffers (hashes, the set's NaN checks) go back before any real work: 17 MiB of
    # ResNet-50 K = 8 or ViT-B/32 K = 4 would otherwise stay resident
    release_free_memory()
    return teachers


def parse_source(spec: str, default_revision: str | None = None) -> tuple[str, str | None]:
    """Split `org/name@rev` into `(repo_id, revision)`; `rev` falls back to `default_revision`."""
    repo_id, _, rev = spec.partition("@")
    return repo_id, (rev or default_revision)


# -------------------------------------------------------------------------------------------- sources
def _looks_like_path(spec: str) -> bool:
    return spec.startswith((".", "/", "~", "\\")) or spec.count("/") > 1 or "\\" in spec or spec.endswith("/")


def _is_hub_spec(spec: str | Path) -> bool:
    text = str(spec)
    return not Path(text).expanduser().is_dir() and not _looks_like_path(text)


def hub_api(token: str | bool | None):
    from huggingface_hub import HfApi

    from . import __version__

    return HfApi(token=token, library_name=LIBRARY_NAME, library_version=__version__)


def _prepare(
    spec: str, revision: str | None, token, api, trust_remote_code: bool, allow_pickle: bool
) -> _Source:
    path = Path(spec).expanduser()
    if path.is_dir():
        src = _prepare_local(spec, path)
    elif _looks_like_path(spec):
        raise TeacherSourceError(f"teacher {spec!r}: folder not found")
    else:
        src = _prepare_hub(spec, revision, token, api)
    _describe(src, trust_remote_code)
    if not src.weights.safetensors and not allow_pickle:
        raise TeacherSourceError(
            f"teacher {src.name!r} only has pickle weights ({', '.join(src.weights.files)}); pickle files "
            "can run code when loaded. Convert it to safetensors, or pass allow_pickle=True (--allow-pickle) "
            "to read it with torch.load(weights_only=True)"
        )
    return src


def _prepare_local(spec: str, path: Path) -> _Source:
    folder = path.resolve()
    src = _Source(name=spec, kind="local", folder=folder)
    src.config = _read_config(src)  # first: a folder that is no model (`/`, a home) fails before it is walked
    src.available = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    src.weights = choose_weight_files(
        src.available, f"teacher {spec!r}", lambda n: _read_json(folder / n, src)
    )
    src.license = _card_license(folder / "README.md")
    return src


def _prepare_hub(spec: str, revision: str | None, token, api) -> _Source:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    repo_id, rev = parse_source(spec, revision)
    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise TeacherSourceError(
            f"teacher {spec!r} is neither an existing folder nor a valid Hub repo id ({err})"
        ) from err
    sha = resolve_hub_revision(api, repo_id, rev, spec)
    available = hub_call(
        lambda: api.list_repo_files(repo_id, revision=sha), spec, repo_id, rev, missing="revision"
    )
    src = _Source(name=spec, kind="hub", folder=Path(), repo_id=repo_id, requested_revision=rev, sha=sha)
    src.available = sorted(available)
    if "config.json" not in src.available:
        raise TeacherSourceError(
            f"teacher {spec!r} (commit {sha[:12]}) has no config.json; is it a model repo?"
        )

    def download(name: str) -> Path:
        return Path(
            hub_call(
                lambda: hf_hub_download(repo_id, name, revision=sha, token=token, library_name=LIBRARY_NAME),
                spec,
                repo_id,
                rev,
            )
        )

    src.folder = download("config.json").parent
    for name in _OPTIONAL_FILES:
        if name in src.available:
            download(name)
    src.config = _read_config(src)
    src.weights = choose_weight_files(
        src.available, f"teacher {spec!r}", lambda n: _read_json(download(n), src)
    )
    src.license = _card_license(src.folder / "README.md")
    return src


def resolve_hub_revision(api, repo_id: str, rev: str | None, spec: str, role: str = "teacher") -> str:
    """The commit sha that `rev` (default: main) of `repo_id` points to, resolved once.

    Later downloads use the sha, so every file comes from the same commit and is served from the cache
    without any request once downloaded.
    """
    from huggingface_hub import is_offline_mode
    from huggingface_hub.errors import RepositoryNotFoundError

    rev = rev or "main"  # explicit: some mirrors reject repo-info requests without a revision

    def resolve(revision: str) -> str:
        if hasattr(api, "resolve_revision"):
            resolved = api.resolve_revision(repo_id, revision=revision, local_files_only=is_offline_mode())
            return getattr(resolved, "resolved", None) or str(resolved)
        return api.model_info(repo_id, revision=revision).sha  # huggingface_hub < 1.26

    try:
        sha = hub_call(lambda: resolve(rev), spec, repo_id, rev, role)
    except TeacherSourceError as err:
        # Some servers answer "repository not found" for a missing branch: tell the two apart.
        if rev != "main" and isinstance(err.__cause__, RepositoryNotFoundError):
            try:
                resolve("main")
            except Exception:
                raise err from err.__cause__
            raise TeacherSourceError(
                f"{role} {spec!r}: revision {rev!r} not found in repo {repo_id!r}"
            ) from err
        raise
    if not sha or not _COMMIT_SHA.match(sha):
        raise TeacherSourceError(f"{role} {spec!r}: revision {rev!r} did not resolve to a commit ({sha!r})")
    return sha


def hub_call(fn, spec: str, repo_id: str, rev: str | None, role: str = "teacher", missing: str = "file"):
    """Run a huggingface_hub call, turning its errors into `TeacherSourceError`s naming `role` `spec`.

    `missing` says what a 404 on an existing repo means for this call ("file" or "revision").
    """
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
        RevisionResolutionError,
    )

    where = f"{role} {spec!r}"
    try:
        return fn()
    except RevisionNotFoundError as err:
        raise TeacherSourceError(f"{where}: revision {rev!r} not found in repo {repo_id!r}") from err
    except GatedRepoError as err:
        raise TeacherSourceError(
            f"{where}: repo {repo_id!r} is gated; accept its terms and pass a token"
        ) from err
    except RepositoryNotFoundError as err:
        raise TeacherSourceError(
            f"{where}: repo {repo_id!r} not found at {constants.ENDPOINT} (or it is private: pass a token), "
            "and no local folder has that name"
        ) from err
    except (EntryNotFoundError, LocalEntryNotFoundError) as err:
        if missing == "revision":
            raise TeacherSourceError(f"{where}: revision {rev!r} not found in repo {repo_id!r}") from err
        raise TeacherSourceError(f"{where}: file not found in repo {repo_id!r} ({first_line(err)})") from err
    except RevisionResolutionError as err:
        raise TeacherSourceError(
            f"{where}: cannot reach the Hub at {constants.ENDPOINT} and revision {rev or 'main'!r} of "
            f"{repo_id!r} is not in the local cache (nor is there a local folder of that name)"
        ) from err
    except HfHubHTTPError as err:
        if missing == "revision" and getattr(getattr(err, "response", None), "status_code", None) == 404:
            raise TeacherSourceError(f"{where}: revision {rev!r} not found in repo {repo_id!r}") from err
        raise TeacherSourceError(f"{where}: Hub request failed ({first_line(err)})") from err
    except (OSError, ConnectionError) as err:
        raise TeacherSourceError(f"{where}: cannot reach the Hub at {constants.ENDPOINT} ({err})") from err
    except Exception as err:
        if type(err).__module__.startswith("httpx"):  # connection refused, timeouts
            raise TeacherSourceError(
                f"{where}: cannot reach the Hub at {constants.ENDPOINT} ({err})"
            ) from err
        raise


def _read_json(path: Path, src: _Source) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise TeacherSourceError(f"teacher {src.name!r}: cannot read {path.name} ({err})") from err


def _read_config(src: _Source) -> dict:
    path = src.folder / "config.json"
    if not path.is_file():
        raise TeacherSourceError(f"teacher {src.name!r} has no config.json in {src.folder}")
    config = _read_json(path, src)
    if not isinstance(config, dict):
        raise TeacherSourceError(f"teacher {src.name!r}: config.json is not a JSON object")
    return config


def _card_license(readme: Path) -> str | None:
    """The `license` of a model card's front matter (`license_name` when it is `other`)."""
    if not readme.is_file():
        return None
    from huggingface_hub.repocard import metadata_load

    try:
        meta = metadata_load(readme) or {}
    except Exception:  # a malformed card must not block loading; the license is then unknown
        return None
    license_ = meta.get("license")
    if license_ == "other" and meta.get("license_name"):
        return f"other:{meta['license_name']}"
    return str(license_) if license_ else None


# ------------------------------------------------------------------------------------- architecture
def _describe(src: _Source, trust_remote_code: bool) -> None:
    """Detect the format and family and describe the architecture, without reading any weights."""
    config = src.config
    if "model_type" in config:
        src.format = "transformers"
        _describe_transformers(src, trust_remote_code)
    elif "architecture" in config:
        src.format = "timm"
        _describe_timm(src)
    else:
        raise UnsupportedArchitectureError(
            f"teacher {src.name!r}: config.json has neither 'architecture' (timm format) nor 'model_type' "
            f"(transformers format); supported families: {supported_families()}"
        )


def _describe_timm(src: _Source) -> None:
    from .families.timm_common import import_timm

    timm = import_timm()
    config = src.config
    src.labels = _timm_labels(config, src.name)
    model_args = config.get("model_args") or {}
    if not isinstance(model_args, dict):
        raise UnsupportedArchitectureError(
            f"teacher {src.name!r}: config.json's model_args is a {type(model_args).__name__}, not an object"
        )
    model_args = {k: v for k, v in model_args.items() if k != "num_classes"}
    try:
        with torch.device("meta"):
            model = timm.create_model(
                config["architecture"], pretrained=False, num_classes=len(src.labels), **model_args
            )
    except (RuntimeError, TypeError, ValueError, KeyError) as err:
        raise UnsupportedArchitectureError(
            f"teacher {src.name!r}: timm cannot build architecture {config['architecture']!r} ({err})"
        ) from err
    model.weightformer_model_args = model_args
    src.family = _family_of(model, src)
    src.arch = src.family.describe(model)
    src.meta_model = model
    src.extra["pretrained_cfg"] = config.get("pretrained_cfg") or {}


def _timm_labels(config: dict, name: str) -> list[str]:
    labels = config.get("label_names")
    num_classes = config.get("num_classes")
    if isinstance(labels, dict):  # ids with gaps are stored as {id: name}
        labels = [labels[k] for k in sorted(labels, key=int)]
    if not labels:
        if not isinstance(num_classes, int) or num_classes < 1:
            raise TeacherSourceError(f"teacher {name!r}: config.json has neither label_names nor num_classes")
        return [str(i) for i in range(num_classes)]
    if isinstance(num_classes, int) and num_classes != len(labels):
        raise TeacherMismatchError(
            f"teacher {name!r}: config.json has num_classes={num_classes} but {len(labels)} label_names"
        )
    return [str(n) for n in labels]


def _transformers_family(model_type: str) -> Family | None:
    for family in FAMILIES.values():
        config_class = getattr(family, "config_class", None)
        if family.format == "transformers" and getattr(config_class, "model_type", None) == model_type:
            return family
    return None


def _describe_transformers(src: _Source, trust_remote_code: bool) -> None:
    from huggingface_hub.errors import StrictDataclassError
    from transformers import AutoConfig

    model_type = src.config["model_type"]
    family = _transformers_family(model_type)
    if family is None:
        if "auto_map" in src.config and not trust_remote_code:
            raise TeacherSourceError(
                f"teacher {src.name!r} (model_type {model_type!r}) needs custom code from the repo to load; "
                "pass trust_remote_code=True (--trust-remote-code) only if you trust it, and pin a commit"
            )
        if not trust_remote_code:
            raise UnsupportedArchitectureError(
                f"teacher {src.name!r}: model_type {model_type!r} "
                f"({', '.join(src.config.get('architectures') or [])}) is not supported; "
                f"supported families: {supported_families()}"
            )
    try:
        config = AutoConfig.from_pretrained(src.folder, trust_remote_code=trust_remote_code)
    except (ValueError, OSError, KeyError, TypeError, StrictDataclassError) as err:  # the last: a field's type
        raise UnsupportedArchitectureError(
            f"teacher {src.name!r}: cannot read its transformers config ({err})"
        ) from err
    with torch.device("meta"):
        if family is not None:
            model = family.model_class(config)
        else:  # custom code, run because the user asked for it
            from transformers import AutoModelForImageClassification

            model = AutoModelForImageClassification.from_config(config, trust_remote_code=True)
    src.family = _family_of(model, src)
    src.arch = src.family.describe(model)
    src.labels = src.family.label_names(model)
    src.meta_model = model


def _family_of(model: nn.Module, src: _Source) -> Family:
    try:
        return family_of(model)
    except UnsupportedArchitectureError as err:
        raise UnsupportedArchitectureError(f"teacher {src.name!r}: {err}") from err


def _check_compatible(sources: list[_Source]) -> None:
    """Same family, architecture and label set for all teachers (before any weight is downloaded)."""
    first = sources[0]
    for src in sources[1:]:
        if src.family is not first.family or src.arch != first.arch:
            raise TeacherMismatchError(
                f"teacher {src.name!r} is {src.family.name} {_arch_summary(src.arch)} but teacher "
                f"{first.name!r} is {first.family.name} {_arch_summary(first.arch)}; all teachers must share "
                "one architecture" + _arch_diff(first.arch, src.arch)
            )
        if len(src.labels) != len(first.labels):
            raise TeacherMismatchError(
                f"teacher {src.name!r} has {len(src.labels)} classes but teacher {first.name!r} has "
                f"{len(first.labels)}"
            )
        if sorted(src.labels) != sorted(first.labels) or len(set(src.labels)) != len(src.labels):
            differing = sorted(set(src.labels) ^ set(first.labels))
            raise TeacherMismatchError(
                f"teacher {src.name!r} has other labels than teacher {first.name!r}; differing labels: "
                f"{differing[:8]}"
            )


def _arch_summary(arch: dict) -> str:
    return str(arch.get("architecture") or arch.get("class") or "")


def _arch_diff(a: dict, b: dict) -> str:
    """The first differing architecture setting, to say what differs."""
    flat_a = {**a.get("model_args", {}), **a.get("config", {})}
    flat_b = {**b.get("model_args", {}), **b.get("config", {})}
    for key in sorted(set(flat_a) | set(flat_b)):
        if flat_a.get(key) != flat_b.get(key):
            return f" ({key}: {flat_a.get(key)!r} vs {flat_b.get(key)!r})"
    return ""


# ------------------------------------------------------------------------------------------- weights
def _read_weights(
    src: _Source, token, allow_pickle: bool, trust_remote_code: bool, device, dtype
) -> Mapping[str, torch.Tensor]:
    if src.kind == "hub":
        _download_weights(src, token)
    else:
        # the config too, as a Hub commit covers it: the same weights under other label names (which reorders
        # the classifier rows) or another architecture setting are another teacher, for caches as for cards
        files = [*src.weights.all_files, *(["config.json"] if (src.folder / "config.json").is_file() else [])]
        src.extra["content_hash"] = content_hash(src.folder, files)
    if src.weights.safetensors:
        for name in src.weights.files:  # truncated/corrupt files fail here, named, before any loading
            check_safetensors(src.folder / name, f"teacher {src.name!r}")
    if src.format == "timm":
        if src.weights.safetensors:
            return LazySafetensorsStateDict(
                src.folder, src.weights.files, f"teacher {src.name!r}", device, dtype
            )
        state = load_pickle_state_dict(src.folder, src.weights.files, f"teacher {src.name!r}")
        return {k: _to(v, device, dtype) for k, v in state.items()}
    return _load_transformers_state(src, trust_remote_code, device, dtype)


def _download_weights(src: _Source, token) -> None:
    from huggingface_hub import snapshot_download

    folder = hub_call(
        lambda: snapshot_download(
            src.repo_id,
            revision=src.sha,
            allow_patterns=src.weights.all_files,
            token=token,
            library_name=LIBRARY_NAME,
        ),
        src.name,
        src.repo_id,
        src.requested_revision,
    )
    src.folder = Path(folder)


def _load_transformers_state(src: _Source, trust_remote_code: bool, device, dtype) -> dict[str, torch.Tensor]:
    """One teacher through `from_pretrained` (fp32), reduced to its state dict; the model is freed."""
    model_class = type(src.meta_model)
    try:
        model, info = model_class.from_pretrained(
            src.folder,
            dtype=torch.float32,
            output_loading_info=True,
            local_files_only=True,
            use_safetensors=src.weights.safetensors,
        )
    except WeightFormerError:
        raise
    except Exception as err:  # transformers raises many types for bad checkpoints; name the teacher
        raise TeacherMismatchError(
            f"teacher {src.name!r}: transformers could not load its weights ({err})"
        ) from err
    for kind, keys in (
        ("lacks tensor", info.get("missing_keys")),
        ("has unexpected tensor", info.get("unexpected_keys")),
    ):
        keys = sorted(keys or [])
        if keys:
            raise TeacherMismatchError(
                f"teacher {src.name!r} {kind} {keys[0]!r} for {src.family.name} {_arch_summary(src.arch)}"
                + (f" (and {len(keys) - 1} more)" if len(keys) > 1 else "")
            )
    mismatched = info.get("mismatched_keys") or []
    if mismatched:
        name = mismatched[0][0] if isinstance(mismatched[0], (tuple, list)) else mismatched[0]
        raise TeacherMismatchError(
            f"teacher {src.name!r}: tensor {name!r} has the wrong shape for its config"
        )
    state = {k: _to(v.detach(), device, dtype) for k, v in model.state_dict().items()}
    del model
    return state


def _to(tensor: torch.Tensor, device, dtype) -> torch.Tensor:
    dtype = dtype if dtype is not None and tensor.is_floating_point() else None
    return tensor.to(device=device, dtype=dtype) if device is not None or dtype is not None else tensor


def _align_label_order(sources: list[_Source], state_dicts: list[Mapping]) -> list[Mapping]:
    """Reorder classifier rows of teachers whose labels are the first teacher's in another order.

    Only the classifier tensors are read and replaced; the rest of a lazy state dict stays unread.
    """
    first = sources[0]
    if all(src.labels == first.labels for src in sources):
        return state_dicts
    classifier = first.family.layers(first.meta_model)[0][-1]
    heads = []
    for src, sd in zip(sources, state_dicts):
        head = {}
        for t in classifier.tensors:
            if t.name not in sd:
                raise TeacherMismatchError(f"teacher {src.name!r} lacks classifier tensor {t.name!r}")
            head[t.name] = sd[t.name]
        heads.append(head)
    names = [src.name for src in sources]
    reordered = _reorder_labels(first.family, first.meta_model, names, [s.labels for s in sources], heads)
    return [
        sd if new is old else OverlayStateDict(sd, new) for sd, new, old in zip(state_dicts, reordered, heads)
    ]


def _info(src: _Source) -> TeacherInfo:
    # "folder": where config, processor and weights lie (a Hub snapshot in the cache, or the local folder)
    extra = {"format": src.format, "files": src.weights.all_files, "folder": str(src.folder), **src.extra}
    preprocessor = src.folder / "preprocessor_config.json"
    if src.format == "transformers" and preprocessor.is_file():
        extra["preprocessor_config"] = json.loads(preprocessor.read_text())
    if src.kind == "hub":
        extra["requested_revision"] = src.requested_revision
        return TeacherInfo(
            name=src.name,
            source="hub",
            repo_id=src.repo_id,
            revision=src.sha,
            license=src.license,
            extra=extra,
        )
    extra["path"] = str(src.folder)
    return TeacherInfo(
        name=src.name,
        source="local",
        content_hash=extra.pop("content_hash"),
        license=src.license,
        extra=extra,
    )


# ---------------------------------------------------------------------------------------- utilities
@contextlib.contextmanager
def no_progress_bars() -> Iterator[None]:
    """Silence huggingface_hub and transformers progress bars (validation comes before any bar)."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
    from transformers.utils import logging as hf_logging

    hub_was_disabled = are_progress_bars_disabled()
    tf_was_enabled = hf_logging.is_progress_bar_enabled()
    disable_progress_bars()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if not hub_was_disabled:
            enable_progress_bars()
        if tf_was_enabled:
            hf_logging.enable_progress_bar()
