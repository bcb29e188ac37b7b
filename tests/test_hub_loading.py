"""load_teachers over HTTP (olah on 127.0.0.1) and from local folders, and one test per bad input."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import LABELS, save_hf, save_timm, tiny_hf, tiny_timm
from safetensors.torch import load_file, save_file

from weightformer_hf import (
    InvalidWeightsError,
    TeacherMismatchError,
    TeacherSourceError,
    UnsupportedArchitectureError,
)
from weightformer_hf.hub import load_teachers
from weightformer_hf.weight_files import LazySafetensorsStateDict

IMAGES = torch.randn(2, 1, 32, 32)
SMALL_IMAGES = torch.randn(2, 1, 16, 16)


# ------------------------------------------------------------------------------------------ over HTTP
def test_timm_teachers_over_http_are_pinned_and_lazy(timm_repos):
    ids, shas = timm_repos.ids, timm_repos.shas
    teachers = load_teachers([ids[0], f"{ids[1]}@{shas[1]}", f"{ids[2]}@main"])
    assert teachers.family.name == "timm_resnet"
    assert [i.revision for i in teachers.infos] == shas
    assert [i.identity for i in teachers.infos] == [f"{r}@{s}" for r, s in zip(ids, shas)]
    assert [i.license for i in teachers.infos] == ["apache-2.0"] * 3
    assert teachers.label_names == LABELS
    assert all(isinstance(sd, LazySafetensorsStateDict) for sd in teachers.state_dicts)
    for i, model in enumerate(timm_repos.models):
        assert torch.equal(teachers.model(i)(IMAGES), model(IMAGES))


@pytest.mark.parametrize("kind", ["resnet", "vit"])
def test_transformers_teachers_over_http(hf_repos, kind):
    repos = hf_repos[kind]
    teachers = load_teachers(repos.ids)
    assert teachers.family.name == f"hf_{kind}"
    assert [i.revision for i in teachers.infos] == repos.shas
    assert teachers.infos[0].license == "mit"
    assert "preprocessor_config" in teachers.infos[0].extra
    for i, model in enumerate(repos.models):
        assert torch.equal(teachers.model(i)(SMALL_IMAGES).logits, model(SMALL_IMAGES).logits)


def test_sharded_timm_checkpoint_over_http(hub, tmp_path):
    model = tiny_timm(5)
    folder = save_timm(model, tmp_path / "sharded")
    state = load_file(folder / "model.safetensors")
    names = sorted(state)
    half = len(names) // 2
    shards = {
        "model-00001-of-00002.safetensors": names[:half],
        "model-00002-of-00002.safetensors": names[half:],
    }
    for shard, keys in shards.items():
        save_file({k: state[k] for k in keys}, folder / shard)
    weight_map = {k: shard for shard, keys in shards.items() for k in keys}
    index = {"metadata": {}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    (folder / "model.safetensors").unlink()
    sha = hub.add_repo("testorg/timm-sharded", folder)
    teachers = load_teachers(["testorg/timm-sharded", str(folder)])
    assert teachers.infos[0].revision == sha
    assert set(teachers.infos[0].extra["files"]) == {"model.safetensors.index.json", *shards}
    for i in range(2):
        assert torch.equal(teachers.model(i)(IMAGES), model(IMAGES))


def test_sharded_transformers_checkpoint(tmp_path):
    model = tiny_hf("resnet", 3)
    model.save_pretrained(tmp_path / "r", max_shard_size="1KB")
    assert (tmp_path / "r" / "model.safetensors.index.json").is_file()
    teachers = load_teachers([str(tmp_path / "r")])
    assert torch.equal(teachers.model(0)(SMALL_IMAGES).logits, model(SMALL_IMAGES).logits)


def test_local_folders_get_a_content_hash(tmp_path):
    model = tiny_timm(0)
    a = save_timm(model, tmp_path / "a", license="mit")
    b = tmp_path / "b"
    shutil.copytree(a, b)
    teachers = load_teachers([a, b])
    infos = teachers.infos
    assert [i.source for i in infos] == ["local", "local"]
    assert infos[0].content_hash.startswith("sha256:") and infos[0].content_hash == infos[1].content_hash
    assert infos[0].revision is None and infos[0].license == "mit"
    # the config is part of the content: other label names (the same weights) make another teacher, whose
    # classifier rows are reordered, so caches keyed by identity must not mistake one for the other
    config = json.loads((b / "config.json").read_text())
    config["label_names"] = config["label_names"][1:] + config["label_names"][:1]
    (b / "config.json").write_text(json.dumps(config))
    relabelled = load_teachers([a, b]).infos
    assert relabelled[0].content_hash == infos[0].content_hash != relabelled[1].content_hash


def test_loading_hands_back_its_validation_reads_after_the_nan_checks(tmp_path, monkeypatch):
    """The teacher set's NaN checks read every tensor: their buffers go back to the OS after them, not before."""
    from weightformer_hf import hub, teachers

    events = []
    validate = teachers.TeacherSet._validate
    monkeypatch.setattr(
        teachers.TeacherSet, "_validate", lambda self, *a: (events.append("nan checks"), validate(self, *a))
    )
    monkeypatch.setattr(hub, "release_free_memory", lambda: events.append("trim"))
    load_teachers([save_timm(tiny_timm(0), tmp_path / "a")])
    assert events == ["nan checks", "trim"]


def test_same_labels_in_another_order_are_reordered(tmp_path):
    a, b = tiny_timm(0), tiny_timm(1, labels=["emu", "cat", "dog"])
    folders = [save_timm(a, tmp_path / "a"), save_timm(b, tmp_path / "b", labels=["emu", "cat", "dog"])]
    teachers = load_teachers(folders)
    assert teachers.label_names == LABELS
    expected = b(IMAGES)[:, [1, 2, 0]]  # b's (emu, cat, dog) columns in (cat, dog, emu) order
    assert torch.equal(teachers.model(1)(IMAGES), expected)


def test_pickle_only_repo_is_refused_unless_allowed(tmp_path):
    import timm

    model = tiny_timm(0)
    timm.models.save_for_hf(model, tmp_path / "p", model_config={"label_names": LABELS})  # pickle only
    assert not (tmp_path / "p" / "model.safetensors").exists()
    with pytest.raises(TeacherSourceError, match=r"'.*p'.*pickle.*allow_pickle"):
        load_teachers([tmp_path / "p"])
    teachers = load_teachers([tmp_path / "p"], allow_pickle=True)
    assert torch.equal(teachers.model(0)(IMAGES), model(IMAGES))


def test_remote_code_never_runs_unless_asked(tmp_path):
    folder = tmp_path / "custom"
    folder.mkdir()
    config = {"model_type": "my-custom-net", "auto_map": {"AutoConfig": "configuration_custom.CustomConfig"}}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "configuration_custom.py").write_text("raise SystemExit('remote code ran')\n")
    save_file({"w": torch.zeros(1)}, folder / "model.safetensors")
    with pytest.raises(TeacherSourceError, match=r"custom.*trust_remote_code"):
        load_teachers([folder])


# ----------------------------------------------------------------------------------------- bad input
def _bad_copy(tmp_path, name, edit, seed=1):
    """A timm teacher folder whose safetensors went through `edit(state) -> state`."""
    folder = save_timm(tiny_timm(seed), tmp_path / name)
    state = load_file(folder / "model.safetensors")
    save_file(edit(state), folder / "model.safetensors")
    return str(folder)


def test_error_different_architectures(tmp_path):
    good = str(save_timm(tiny_timm(0), tmp_path / "good"))
    wide = str(save_timm(tiny_timm(1, channels=(8, 16, 16, 32)), tmp_path / "wide"))
    with pytest.raises(TeacherMismatchError, match=r"'.*wide'.*'.*good'.*channels"):
        load_teachers([good, wide])


def test_error_different_families(tmp_path, hf_repos):
    good = str(save_timm(tiny_timm(0), tmp_path / "good"))
    with pytest.raises(TeacherMismatchError, match=r"'testorg/hf-resnet-a' is hf_resnet.*timm_resnet"):
        load_teachers([good, hf_repos["resnet"].ids[0]])


def test_error_missing_tensor(tmp_path):
    good = str(save_timm(tiny_timm(0), tmp_path / "good"))
    bad = _bad_copy(tmp_path, "bad", lambda s: {k: v for k, v in s.items() if k != "layer2.0.conv1.weight"})
    with pytest.raises(TeacherMismatchError, match=r"'.*bad'.*'layer2\.0\.conv1\.weight'"):
        load_teachers([good, bad])


def test_error_unexpected_tensor(tmp_path):
    good = str(save_timm(tiny_timm(0), tmp_path / "good"))
    bad = _bad_copy(tmp_path, "bad", lambda s: {**s, "extra.weight": torch.zeros(2)})
    with pytest.raises(TeacherMismatchError, match=r"'.*bad'.*'extra\.weight'"):
        load_teachers([good, bad])


def test_error_wrong_shape(tmp_path):
    good = str(save_timm(tiny_timm(0), tmp_path / "good"))
    bad = _bad_copy(tmp_path, "bad", lambda s: {**s, "fc.bias": torch.zeros(4)})
    with pytest.raises(TeacherMismatchError, match=r"'fc\.bias'.*'.*bad'"):
        load_teachers([good, bad])


def test_error_different_class_counts(tmp_path):
    good = str(save_timm(tiny_timm(0), tmp_path / "good"))
    four = ["cat", "dog", "emu", "fox"]
    bad = str(save_timm(tiny_timm(1, labels=four), tmp_path / "four", labels=four))
    with pytest.raises(TeacherMismatchError, match=r"'.*four' has 4 classes but teacher '.*good' has 3"):
        load_teachers([good, bad])


def test_error_different_label_sets(tmp_path):
    good = str(save_timm(tiny_timm(0), tmp_path / "good"))
    other = ["cat", "dog", "yak"]
    bad = str(save_timm(tiny_timm(1, labels=other), tmp_path / "yak", labels=other))
    with pytest.raises(TeacherMismatchError, match=r"'.*yak' has other labels.*'emu', 'yak'"):
        load_teachers([good, bad])


def test_error_missing_repo(hub):
    with pytest.raises(TeacherSourceError, match=r"'testorg/does-not-exist'.*not found"):
        load_teachers(["testorg/does-not-exist"])


def test_error_missing_branch(timm_repos):
    message = r"revision 'no-such-branch' not found in repo 'testorg/timm-a'"
    with pytest.raises(TeacherSourceError, match=message):
        load_teachers([f"{timm_repos.ids[0]}@no-such-branch"])


def test_error_missing_commit(timm_repos):
    missing = "0" * 40
    with pytest.raises(TeacherSourceError, match=rf"revision '{missing}' not found in repo 'testorg/timm-a'"):
        load_teachers([f"{timm_repos.ids[0]}@{missing}"])


def test_error_missing_local_folder(tmp_path):
    with pytest.raises(TeacherSourceError, match=r"'.*nowhere': folder not found"):
        load_teachers([str(tmp_path / "nowhere")])


def test_error_truncated_safetensors_over_http(hub, tmp_path):
    folder = save_timm(tiny_timm(0), tmp_path / "trunc")
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    hub.add_repo("testorg/timm-truncated", folder)
    message = r"'testorg/timm-truncated'.*'model\.safetensors'.*truncated"
    with pytest.raises(InvalidWeightsError, match=message):
        load_teachers(["testorg/timm-truncated"])


def test_error_corrupt_safetensors_transformers(tmp_path):
    folder = save_hf(tiny_hf("resnet", 0), tmp_path / "corrupt")
    (folder / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(InvalidWeightsError, match=r"'.*corrupt'.*'model\.safetensors'"):
        load_teachers([folder])


@pytest.mark.parametrize("value, kind", [(float("nan"), "NaN"), (float("inf"), "inf")])
def test_error_non_finite_weights(tmp_path, value, kind):
    good = str(save_timm(tiny_timm(0), tmp_path / "good"))

    def poison(state):
        state["layer3.0.conv2.weight"][0, 0, 0, 0] = value
        return state

    bad = _bad_copy(tmp_path, "poisoned", poison)
    with pytest.raises(InvalidWeightsError, match=rf"'.*poisoned'.*'layer3\.0\.conv2\.weight'.*{kind}"):
        load_teachers([good, bad])


def test_error_unsupported_timm_architecture(tmp_path):
    folder = tmp_path / "mobilenet"
    folder.mkdir()
    config = {"architecture": "mobilenetv3_small_050", "num_classes": 3}
    (folder / "config.json").write_text(json.dumps(config))
    save_file({"w": torch.zeros(1)}, folder / "model.safetensors")
    with pytest.raises(UnsupportedArchitectureError, match=r"'.*mobilenet'.*MobileNetV3.*supported families"):
        load_teachers([folder])


def test_error_unsupported_transformers_model_type(tmp_path):
    folder = tmp_path / "bert"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    save_file({"w": torch.zeros(1)}, folder / "model.safetensors")
    with pytest.raises(UnsupportedArchitectureError, match=r"'.*bert'.*'bert'.*supported families"):
        load_teachers([folder])


def test_integer_weights_and_a_missing_shard_are_named(tmp_path):
    a = save_timm(tiny_timm(0), tmp_path / "a")
    b = save_timm(tiny_timm(1), tmp_path / "b")
    weights = load_file(b / "model.safetensors")
    weights["fc.weight"] = weights["fc.weight"].to(torch.int32)  # zeros after the cast: not a trained weight
    save_file(weights, b / "model.safetensors")
    with pytest.raises(TeacherMismatchError, match=r"tensor 'fc.weight' of teacher '.*b' is not floating point"):
        load_teachers([a, b])
    sharded = tmp_path / "sharded"
    shutil.copytree(a, sharded)
    weights = load_file(sharded / "model.safetensors")
    (sharded / "model.safetensors").unlink()
    names = sorted(weights)
    first, second = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
    save_file({k: weights[k] for k in names[:5]}, sharded / first)  # the second shard never arrived
    index = {"metadata": {}, "weight_map": {k: (first if i < 5 else second) for i, k in enumerate(names)}}
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(InvalidWeightsError, match=f"lists shard '{second}', which is missing"):
        load_teachers([a, sharded])


def test_repeated_class_names_are_fine_in_one_order_and_named_when_rows_must_be_reordered():
    from weightformer_hf import TeacherSet
    from weightformer_hf.reference_models import MLPClassifier, MLPClassifierConfig

    def mlp(names):  # ImageNet's readable names repeat ("crane", "maillot"): the same order must still load
        return MLPClassifier(MLPClassifierConfig(hidden_sizes=(8,), id2label=dict(enumerate(names))))

    TeacherSet.from_models([mlp(["cat", "cat", "emu"]), mlp(["cat", "cat", "emu"])])
    with pytest.raises(TeacherMismatchError, match=r"order their classes differently, and \['cat'\] appear more"):
        TeacherSet.from_models([mlp(["cat", "cat", "emu"]), mlp(["emu", "cat", "cat"])])


def test_an_in_memory_timm_model_whose_constructor_arguments_are_not_visible_is_named():
    import timm

    from weightformer_hf import TeacherSet

    def make():
        return timm.create_model("resnet10t", num_classes=3, in_chans=1, stem_width=16)

    with pytest.raises(TeacherMismatchError, match=r"tensor 'bn1.bias' is \(32,\) in the model but \(64,\) when built"
                                                   r"\. timm models do not record"):  # fmt: skip
        TeacherSet.from_models([make(), make()])
    models = [make(), make()]
    for model in models:  # what save_for_hf(model_args=...) would record
        model.weightformer_model_args = {"in_chans": 1, "stem_width": 16}
    assert TeacherSet.from_models(models).template.bn1.bias.shape == (32,)


def test_malformed_configs_and_pickles_are_named_with_the_teacher(tmp_path):
    a = save_timm(tiny_timm(0), tmp_path / "a")
    listed = tmp_path / "listed"
    shutil.copytree(a, listed)
    config = json.loads((listed / "config.json").read_text())
    config["model_args"] = ["in_chans", 1]
    (listed / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedArchitectureError, match=r"teacher '.*listed': config.json's model_args is a list"):
        load_teachers([a, listed])
    hf = save_hf(tiny_hf("resnet", 0), tmp_path / "hf")
    config = json.loads((hf / "config.json").read_text())
    config["hidden_sizes"] = "x"  # a field of the wrong type: huggingface_hub's strict dataclasses refuse it
    (hf / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedArchitectureError, match=r"teacher '.*hf': cannot read its transformers config"):
        load_teachers([hf])
    pickled = tmp_path / "pickled"
    shutil.copytree(a, pickled)
    (pickled / "model.safetensors").unlink()
    (pickled / "pytorch_model.bin").write_bytes(b"not a zip archive")
    with pytest.raises(InvalidWeightsError) as error:
        load_teachers([pickled], allow_pickle=True)
    message = str(error.value)
    assert "pickled" in message and "'pytorch_model.bin' safely" in message and "weights_only=False" not in message
