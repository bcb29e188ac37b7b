"""Push students and generators to the Hub: one repo creation, then exactly one commit.

Everything goes through `HfApi.create_repo(exist_ok=True)` and one `HfApi.upload_folder`, so a push is
atomic (weights, config, preprocessor and card land together) and tests can assert at that boundary.
The token is passed to `HfApi` only; it is never printed or logged.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from torch import nn

from .hub import hub_api

logger = logging.getLogger(__name__)


def upload_folder_once(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    create_pr: bool = False,
    token: str | bool | None = None,
    commit_message: str = "Upload with weightformer_hf",
):
    """Create `repo_id` if needed and upload `folder` as exactly one commit; return the `CommitInfo`.

    A `revision` that is not a branch yet is created from the default branch first (a ref, not a commit),
    unless `create_pr` is set: then the commit opens a pull request against `revision`.
    """
    api = hub_api(token)
    url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    repo_id = getattr(url, "repo_id", None) or repo_id  # resolves a namespace-less id
    if revision and not create_pr and revision != "main":
        api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
    logger.info("uploading %s to %s (revision=%s, create_pr=%s)", folder, repo_id, revision, create_pr)
    return api.upload_folder(
        repo_id=repo_id,
        folder_path=str(folder),
        repo_type="model",
        revision=revision,
        create_pr=create_pr,
        commit_message=commit_message,
    )


def push_student_to_hub(
    out_dir_or_student: str | Path | nn.Module,
    repo_id: str,
    private: bool = False,
    revision: str | None = None,
    create_pr: bool = False,
    token: str | bool | None = None,
    *,
    commit_message: str = "Upload WeightFormer student",
    **save_kwargs,
):
    """Push a student to `repo_id` in one commit; return the `CommitInfo`.

    Args:
        out_dir_or_student: a folder written by `save_student`, or a student model (saved to a temporary
            folder with `save_student(student, tmp, **save_kwargs)` first, e.g. `teachers=`, `generator=`).
        repo_id: the target repo (`org/name`), created if missing.
        private, revision, create_pr: passed to `create_repo` / `upload_folder`.
        token: Hub token (never printed or logged).
    """
    def upload(folder: str | Path):
        return upload_folder_once(folder, repo_id, private=private, revision=revision, create_pr=create_pr,
                                  token=token, commit_message=commit_message)  # fmt: skip

    if isinstance(out_dir_or_student, nn.Module):
        from .export import save_student

        with tempfile.TemporaryDirectory() as tmp:
            save_student(out_dir_or_student, tmp, model_name=repo_id.split("/")[-1], **save_kwargs)
            return upload(tmp)
    folder = Path(out_dir_or_student)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"{folder} is not a saved student folder (no config.json); run save_student first"
        )
    return upload(folder)


# ------------------------------------------------------------------------------------ generator card
def generator_model_card(model, repo_id: str | None = None):
    """The generator's `ModelCard`: the family it serves, its training pool and its held-out results."""
    from huggingface_hub import ModelCard, ModelCardData

    config = model.config
    student = config.student or {}
    arch = student.get("arch") or {}
    arch_name = arch.get("architecture") or arch.get("class") or "unknown"
    labels = student.get("label_names") or []
    pool = list(config.training_pool or [])
    hub_pool = sorted({p.split("@", 1)[0] for p in pool if _is_hub_identity(p)})
    data = ModelCardData(
        library_name="transformers",
        tags=["weightformer", "hypernetwork", "model-merging", student.get("family") or "unknown-family"],
        base_model=hub_pool or None,
        **({"base_model_relation": "merge"} if hub_pool else {}),
    )
    name = repo_id or getattr(model, "name_or_path", "") or "WeightFormer generator"
    lines = [
        f"# {name}",
        "",
        "A [WeightFormer](https://arxiv.org/abs/2210.01973) generator: it reads the weights of K ≥ 1 "
        "trained teachers of one architecture and writes one student network in a single forward pass.",
        "",
        "## What it serves",
        "",
        f"- Family: `{student.get('family', 'unknown')}`",
        f"- Architecture: `{arch_name}`",
        f"- Classes: {len(labels)}"
        + (f" ({', '.join(map(str, labels[:10]))}{', ...' if len(labels) > 10 else ''})" if labels else ""),
        "",
        "Teachers must match this architecture and label set exactly; other teachers are refused with an "
        "error naming them.",
        "",
        "## Training pool",
        "",
    ]
    lines += [f"- `{p}`" for p in pool] if pool else ["Not recorded."]
    lines += ["", "## Held-out results", ""]
    results = config.heldout_results or {}
    if results:
        lines += ["| metric | value |", "|---|---|"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in results.items()]
    else:
        lines.append("Not recorded.")
    lines += [
        "",
        "## Usage",
        "",
        "```bash",
        f"weightformer generate --generator {repo_id or '<this repo>'} \\",
        "    --teachers org/a org/b org/c --out student",
        "```",
        "",
    ]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))


def _is_hub_identity(identity: str) -> bool:
    repo, _, _ = identity.partition("@")
    return repo.count("/") == 1 and not repo.startswith((".", "/", "sha256:"))


def _fmt(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def push_generator_to_hub(
    model,
    repo_id: str,
    private: bool = False,
    revision: str | None = None,
    create_pr: bool = False,
    token: str | bool | None = None,
    *,
    commit_message: str = "Upload WeightFormer generator",
):
    """Save a `WeightFormerModel` and its generator card, push both in one commit; return the `CommitInfo`."""
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        generator_model_card(model, repo_id).save(Path(tmp) / "README.md")
        return upload_folder_once(
            tmp,
            repo_id,
            private=private,
            revision=revision,
            create_pr=create_pr,
            token=token,
            commit_message=commit_message,
        )


def weightformer_push_to_hub(
    self,
    repo_id: str,
    *,
    private: bool | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    token: str | bool | None = None,
    commit_message: str | None = None,
    **kwargs,
):
    """Drop-in `WeightFormerModel.push_to_hub`: one commit with the weights and the generator card.

    Wire it in `modeling_weightformer.py` with `push_to_hub = weightformer_push_to_hub` (or a method that
    calls it). Other transformers keyword arguments (`max_shard_size`, ...) are refused, not ignored.
    """
    if kwargs:
        raise TypeError(f"push_to_hub does not support {sorted(kwargs)} for WeightFormer generators")
    return push_generator_to_hub(
        self,
        repo_id,
        private=bool(private),
        revision=revision,
        create_pr=create_pr,
        token=token,
        commit_message=commit_message or "Upload WeightFormer generator",
    )
