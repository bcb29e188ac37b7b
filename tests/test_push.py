"""Pushes, asserted at the HfApi boundary (no offline server accepts uploads): files, one commit, no token."""

from __future__ import annotations

import logging
from pathlib import Path
from unittest import mock

import pytest
from conftest import save_timm, tiny_timm
from huggingface_hub import HfApi, ModelCard

from weightformer_hf import WeightFormerModel
from weightformer_hf.export import save_student
from weightformer_hf.hub import load_teachers
from weightformer_hf.push import push_generator_to_hub, push_student_to_hub, weightformer_push_to_hub

TOKEN = "hf_DoNotPrintThisSecret0123456789"


class HubRecorder:
    """Patches HfApi's write methods; records every call and the uploaded folder's files at upload time."""

    def __init__(self):
        self.uploads: list[dict] = []
        self.repos: list[dict] = []
        self.branches: list[dict] = []
        self.tokens: list = []

    def create_repo(self, api, repo_id, **kwargs):
        self.tokens.append(api.token)
        self.repos.append({"repo_id": repo_id, **kwargs})
        return mock.Mock(repo_id=repo_id)

    def create_branch(self, api, repo_id, **kwargs):
        self.branches.append({"repo_id": repo_id, **kwargs})

    def upload_folder(self, api, *, repo_id, folder_path, **kwargs):
        self.tokens.append(api.token)
        root = Path(folder_path)
        files = {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}
        self.uploads.append({"repo_id": repo_id, "files": files, **kwargs})
        return mock.Mock(commit_url=f"https://hub.example/{repo_id}/commit/abc", oid="a" * 40)

    def __enter__(self):
        def refuse(*args, **kwargs):
            raise AssertionError("a push must be exactly one upload_folder commit")

        self._patches = [
            mock.patch.object(HfApi, "create_repo", autospec=True, side_effect=self.create_repo),
            mock.patch.object(HfApi, "create_branch", autospec=True, side_effect=self.create_branch),
            mock.patch.object(HfApi, "upload_folder", autospec=True, side_effect=self.upload_folder),
            mock.patch.object(HfApi, "create_commit", autospec=True, side_effect=refuse),
            mock.patch.object(HfApi, "upload_file", autospec=True, side_effect=refuse),
        ]
        for patch in self._patches:
            patch.start()
        return self

    def __exit__(self, *exc):
        for patch in self._patches:
            patch.stop()


@pytest.fixture
def teachers(tmp_path, timm_repos):
    local = save_timm(tiny_timm(3), tmp_path / "local-teacher")
    return load_teachers([timm_repos.ids[0], timm_repos.ids[1], local])


def _assert_no_token(caplog, capsys):
    captured = capsys.readouterr()
    assert TOKEN not in caplog.text and TOKEN not in captured.out and TOKEN not in captured.err


def test_push_student_folder_is_exactly_one_commit(teachers, tmp_path, caplog, capsys):
    caplog.set_level(logging.DEBUG)
    out = save_student(teachers.model(0), tmp_path / "student", teachers=teachers, anchor=0)
    with HubRecorder() as hub:
        commit = push_student_to_hub(
            out, "org/student", private=True, revision="dev", create_pr=True, token=TOKEN
        )
    assert commit.oid == "a" * 40
    assert hub.repos == [{"repo_id": "org/student", "private": True, "exist_ok": True, "repo_type": "model"}]
    assert hub.branches == []  # a PR targets the revision; no branch is created
    (upload,) = hub.uploads
    assert upload["repo_id"] == "org/student"
    assert upload["revision"] == "dev" and upload["create_pr"] is True
    assert set(upload["files"]) == {
        "config.json",
        "model.safetensors",
        "README.md",
        "weightformer_config.json",
    }
    assert upload["files"]["model.safetensors"] == (out / "model.safetensors").read_bytes()
    card = ModelCard(upload["files"]["README.md"].decode())
    assert card.data.base_model == [teachers.infos[0].repo_id, teachers.infos[1].repo_id]
    assert hub.tokens == [TOKEN, TOKEN]
    _assert_no_token(caplog, capsys)


def test_push_student_model_saves_then_uploads_once(teachers, caplog, capsys):
    caplog.set_level(logging.DEBUG)
    with HubRecorder() as hub:
        push_student_to_hub(teachers.model(1), "org/student2", revision="v2", token=TOKEN, teachers=teachers)
    assert hub.branches == [
        {"repo_id": "org/student2", "branch": "v2", "exist_ok": True, "repo_type": "model"}
    ]
    (upload,) = hub.uploads
    assert upload["revision"] == "v2" and upload["create_pr"] is False
    assert {"config.json", "model.safetensors", "README.md"} <= set(upload["files"])
    assert "# student2" in upload["files"]["README.md"].decode()
    _assert_no_token(caplog, capsys)


def test_push_student_folder_must_exist(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        push_student_to_hub(tmp_path, "org/x")


def _trained_looking_generator(teachers):
    generator = WeightFormerModel.for_teachers(teachers, hidden_size=16, intermediate_size=32)
    generator.config.training_pool = [info.identity for info in teachers.infos]
    generator.config.heldout_results = {"student_accuracy": 0.91, "gain_recovered": 0.5}
    return generator


def test_push_generator_with_its_card(teachers, caplog, capsys):
    caplog.set_level(logging.DEBUG)
    generator = _trained_looking_generator(teachers)
    with HubRecorder() as hub:
        push_generator_to_hub(generator, "org/generator", token=TOKEN, create_pr=True)
    (upload,) = hub.uploads
    assert upload["create_pr"] is True
    assert {"config.json", "model.safetensors", "README.md"} <= set(upload["files"])
    card = ModelCard(upload["files"]["README.md"].decode())
    assert "timm_resnet" in card.text and "resnet10t" in card.text
    for identity in generator.config.training_pool:
        assert identity in card.text
    assert "student_accuracy | 0.9100" in card.text
    assert card.data.base_model == [teachers.infos[0].repo_id, teachers.infos[1].repo_id]
    assert "weightformer" in card.data.tags
    _assert_no_token(caplog, capsys)


def test_push_to_hub_replacement_for_weightformer_model(teachers):
    generator = _trained_looking_generator(teachers)
    with HubRecorder() as hub:
        weightformer_push_to_hub(generator, "org/generator", private=True, token=TOKEN)
    assert len(hub.uploads) == 1 and hub.repos[0]["private"] is True
    with pytest.raises(TypeError, match="max_shard_size"):
        weightformer_push_to_hub(generator, "org/generator", max_shard_size="1GB")
