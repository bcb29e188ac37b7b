"""save_student: timm and transformers repos that reload bit-exact (also via the local Hub), and the card."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import LABELS, save_timm, tiny_timm
from huggingface_hub import ModelCard

from weightformer_hf import UnsupportedArchitectureError, WeightFormerModel
from weightformer_hf.export import save_student
from weightformer_hf.hub import load_teachers

IMAGES = torch.randn(2, 1, 32, 32)
SMALL_IMAGES = torch.randn(2, 1, 16, 16)


def _generate(teachers, anchor=0):
    """A student that differs from the anchor: an untrained generator with non-zero decoders."""
    torch.manual_seed(0)
    generator = WeightFormerModel.for_teachers(teachers, hidden_size=16, intermediate_size=32)
    for decoder in generator.decoders:
        torch.nn.init.normal_(decoder.weight, std=1e-3)
    generator.weightformer_source = "testorg/generator@" + "1" * 40
    student = generator.generate_student(teachers, anchor=anchor)
    anchor_state = teachers.model(anchor).state_dict()
    assert any(not torch.equal(v, anchor_state[k]) for k, v in student.state_dict().items())
    return generator, student


@pytest.fixture(scope="module")
def timm_student(timm_repos, tmp_path_factory):
    teachers = load_teachers(timm_repos.ids)
    generator, student = _generate(teachers, anchor=1)
    out = save_student(
        student,
        tmp_path_factory.mktemp("student") / "student-timm",
        teachers=teachers,
        generator=generator,
        metrics={"accuracy": 0.75},
        anchor=1,
        dataset="testorg/digits",
    )
    return teachers, student, out


def test_timm_student_config(timm_student):
    _, _, out = timm_student
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == "resnet10t"
    assert config["num_classes"] == 3 and config["label_names"] == LABELS
    assert "num_classes" not in config["model_args"]  # else transformers' timm wrapper fails
    assert config["pretrained_cfg"]["input_size"][0] == 1
    assert {"mean", "std"} <= set(config["pretrained_cfg"])
    assert (out / "model.safetensors").is_file() and not (out / "pytorch_model.bin").exists()


def test_timm_student_round_trip_through_the_hub(hub, timm_student):
    import timm
    from transformers import AutoModelForImageClassification

    _, student, out = timm_student
    expected = student(IMAGES)
    hub.add_repo("testorg/student-timm", out)
    from_hub = timm.create_model("hf-hub:testorg/student-timm", pretrained=True).eval()
    assert torch.equal(from_hub(IMAGES), expected)
    assert from_hub.pretrained_cfg["label_names"] == LABELS
    from_dir = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    assert torch.equal(from_dir(IMAGES), expected)
    wrapped = AutoModelForImageClassification.from_pretrained(out, dtype=torch.float32).eval()
    # the wrapper holds bit-identical weights; its forward may take another (equally exact) kernel path
    wrapped_state = {k.removeprefix("timm_model."): v for k, v in wrapped.state_dict().items()}
    for name, tensor in student.state_dict().items():
        assert torch.equal(wrapped_state[name], tensor), name
    torch.testing.assert_close(wrapped(IMAGES).logits, expected, rtol=1e-5, atol=1e-6)


def test_student_card(timm_student):
    teachers, _, out = timm_student
    card = ModelCard.load(out / "README.md")
    data = card.data.to_dict()
    assert card.data.base_model == [info.repo_id for info in teachers.infos]
    assert data["base_model_relation"] == "merge"
    assert {"weightformer", "merge", "timm"} <= set(data["tags"])
    assert data["license"] == "apache-2.0" and data["library_name"] == "timm"
    result = data["model-index"][0]["results"][0]
    assert result["metrics"] == [{"type": "accuracy", "value": 0.75}]
    assert result["dataset"]["type"] == "testorg/digits"
    for info in teachers.infos:
        assert info.revision in card.text
    assert "testorg/generator" in card.text and "1" * 40 in card.text
    assert "K = 3" in card.text and "(anchor)" in card.text
    provenance = json.loads((out / "weightformer_config.json").read_text())
    assert provenance["anchor"] == 1 and provenance["teachers"][0]["revision"] == teachers.infos[0].revision


def test_local_teachers_are_named_in_the_text_only_and_licenses_are_checked(timm_repos, tmp_path):
    local = save_timm(tiny_timm(7), tmp_path / "mine", license="mit")
    teachers = load_teachers([timm_repos.ids[0], local])
    with pytest.warns(UserWarning, match="licenses disagree"):
        out = save_student(teachers.model(0), tmp_path / "out", teachers=teachers)
    card = ModelCard.load(out / "README.md")
    assert card.data.base_model == [timm_repos.ids[0]]
    assert card.data.license == "other"
    assert teachers.infos[1].content_hash in card.text
    assert "model-index" not in card.data.to_dict()


def test_card_without_hub_teachers_has_no_base_model(tmp_path):
    teachers = load_teachers([save_timm(tiny_timm(0), tmp_path / "a", license="mit")])
    out = save_student(
        teachers.model(0), tmp_path / "out", teachers=teachers, generator="untrained", anchor=0
    )
    data = ModelCard.load(out / "README.md").data.to_dict()
    assert "base_model" not in data and "base_model_relation" not in data
    assert data["license"] == "mit"


@pytest.mark.parametrize("kind", ["resnet", "vit"])
def test_transformers_student_round_trip_through_the_hub(hub, hf_repos, tmp_path, kind):
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    repos = hf_repos[kind]
    teachers = load_teachers(repos.ids)
    _, student = _generate(teachers)
    out = save_student(student, tmp_path / f"student-{kind}", teachers=teachers, anchor=0)
    config = json.loads((out / "config.json").read_text())
    assert config["id2label"] == {str(i): n for i, n in enumerate(LABELS)} and "label2id" in config
    assert (out / "preprocessor_config.json").is_file() and (out / "model.safetensors").is_file()
    sha = hub.add_repo(f"testorg/student-hf-{kind}", out)
    reloaded = AutoModelForImageClassification.from_pretrained(
        f"testorg/student-hf-{kind}", revision=sha, dtype=torch.float32
    ).eval()
    assert torch.equal(reloaded(SMALL_IMAGES).logits, student(SMALL_IMAGES).logits)
    processor = AutoImageProcessor.from_pretrained(f"testorg/student-hf-{kind}", revision=sha)
    from PIL import Image

    pixels = processor(Image.new("L", (20, 20)), return_tensors="pt")["pixel_values"]
    assert pixels.shape == (1, 1, 16, 16)
    card = ModelCard.load(out / "README.md")
    assert card.data.base_model == repos.ids and card.data.license == "mit"
    assert "transformers" in card.data.tags


def test_timm_student_in_transformers_format(timm_student, tmp_path):
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    teachers, student, _ = timm_student
    out = save_student(student, tmp_path / "wrapped", format="transformers", teachers=teachers)
    model = AutoModelForImageClassification.from_pretrained(out, dtype=torch.float32).eval()
    assert type(model).__name__ == "TimmWrapperForImageClassification"
    wrapped_state = {k.removeprefix("timm_model."): v for k, v in model.state_dict().items()}
    for name, tensor in student.state_dict().items():
        assert torch.equal(wrapped_state[name], tensor), name  # the weights are bit-identical
    torch.testing.assert_close(model(IMAGES).logits, student(IMAGES), rtol=1e-5, atol=1e-6)
    assert model.config.id2label == dict(enumerate(LABELS))
    AutoImageProcessor.from_pretrained(out)
    assert "transformers" in ModelCard.load(out / "README.md").data.tags


def test_transformers_student_cannot_become_timm(hf_repos, tmp_path):
    teachers = load_teachers(hf_repos["resnet"].ids[:1])
    with pytest.raises(UnsupportedArchitectureError, match="hf_resnet.*cannot be saved in timm format"):
        save_student(teachers.model(0), tmp_path / "x", format="timm", teachers=teachers)


def test_reference_mlp_student_has_no_image_processor(tmp_path):
    from transformers import AutoModel

    from weightformer_hf.reference_models import MLPClassifier, MLPClassifierConfig

    folders = []
    for i in range(2):
        torch.manual_seed(i)
        MLPClassifier(MLPClassifierConfig(hidden_sizes=[8])).save_pretrained(tmp_path / f"mlp{i}")
        folders.append(tmp_path / f"mlp{i}")
    teachers = load_teachers(folders)
    _, student = _generate(teachers)
    out = save_student(student, tmp_path / "student", teachers=teachers)
    assert not (out / "preprocessor_config.json").exists()
    reloaded = AutoModel.from_pretrained(out, dtype=torch.float32)
    signals = torch.randn(3, 40)
    assert torch.equal(reloaded(signals).logits, student(signals).logits)


def test_a_new_student_folder_appears_whole_and_a_second_save_replaces_the_first(timm_repos, tmp_path, monkeypatch):
    import os
    import stat

    from safetensors.torch import load_file

    import weightformer_hf.export as export

    teachers = load_teachers(timm_repos.ids)
    _, first = _generate(teachers, anchor=0)
    renamed = []
    replace = os.replace
    monkeypatch.setattr(export.os, "replace", lambda a, b: (renamed.append((Path(a), Path(b))), replace(a, b))[1])
    out = save_student(first, tmp_path / "student", teachers=teachers, anchor=0)
    # one rename of the whole staged folder, with the mode a plain mkdir gives (not mkdtemp's 0700)
    assert len(renamed) == 1 and renamed[0][1] == out and renamed[0][0].parent == tmp_path
    (tmp_path / "plain").mkdir()
    assert stat.S_IMODE(out.stat().st_mode) == stat.S_IMODE((tmp_path / "plain").stat().st_mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain", "student"]

    # a second save into the same folder: the stale shard goes, files move one by one, card and record last
    (out / "model-00002-of-00002.safetensors").write_bytes(b"stale")
    (out / "notes.txt").write_text("mine")
    renamed.clear()
    _, second = _generate(teachers, anchor=1)
    save_student(second, out, teachers=teachers, anchor=1)
    moved = [b.name for _, b in renamed]
    assert moved[-2:] == ["README.md", "weightformer_config.json"] and "model.safetensors" in moved
    assert not (out / "model-00002-of-00002.safetensors").exists() and (out / "notes.txt").read_text() == "mine"
    state = load_file(out / "model.safetensors")
    assert all(torch.equal(state[k], v) for k, v in second.state_dict().items() if k in state)
    assert json.loads((out / "weightformer_config.json").read_text())["anchor"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain", "student"]
