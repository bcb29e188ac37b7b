"""Data splits, transforms, the teacher-logits cache and BatchNorm recalibration, in-process and small."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from weightformer_hf import InvalidWeightsError, TeacherSet, data, training
from weightformer_hf.reference_models import MLPClassifier, MLPClassifierConfig

LABELS = {i: str(i) for i in range(10)}


def test_mnist1d_splits_have_a_fresh_meta_split_and_are_cached(tmp_path, monkeypatch):
    splits = data.mnist1d_splits(num_samples=300, meta_samples=100, cache_dir=tmp_path)
    assert {k: len(v) for k, v in splits.items()} == {"train": 200, "test": 100, "meta": 100}
    assert splits["train"].features["label"].names == data.DIGIT_NAMES
    train = {tuple(x) for x in splits["train"][data.SIGNAL_COLUMN]}
    assert not train & {tuple(x) for x in splits["meta"][data.SIGNAL_COLUMN]}  # another seed: new samples
    monkeypatch.setattr(data, "_mnist1d_draw", lambda *a, **k: pytest.fail("drawn again instead of reloaded"))
    again = data.mnist1d_splits(num_samples=300, meta_samples=100, cache_dir=tmp_path)
    assert again["meta"]._fingerprint == splits["meta"]._fingerprint  # reloaded from disk, same identity
    assert again["meta"][data.SIGNAL_COLUMN] == splits["meta"][data.SIGNAL_COLUMN]

    task = data.task_splits(splits, data.signal_transform())
    batch = data.collate([task["meta"][i] for i in range(4)])
    assert batch["inputs"].shape == (4, 40) and batch["inputs"].dtype == torch.float32
    assert batch["index"].tolist() == [0, 1, 2, 3]


def test_mnist5k_images_with_the_teachers_image_processor():
    splits = data.mnist5k_splits()
    assert {k: len(v) for k, v in splits.items()} == {"train": 3000, "meta": 1000, "test": 1000}
    processor = {"image_processor_type": "ViTImageProcessor", "do_resize": False,
                 "image_mean": [0.1307], "image_std": [0.3081]}  # fmt: skip
    transform = data.image_transform({"preprocessor_config": processor})
    inputs, labels = data.tensors(data.task_splits(splits, transform)["test"].select(range(8)))
    assert inputs.shape == (8, 1, 28, 28) and labels.shape == (8,)
    with pytest.raises(data.DataError, match="image transform is unknown"):
        data.image_transform({})


def test_teacher_logits_cache_is_keyed_by_teacher_and_data(tmp_path, monkeypatch):
    torch.manual_seed(0)
    models = [MLPClassifier(MLPClassifierConfig(hidden_sizes=(8,), id2label=LABELS)) for _ in range(2)]
    teachers = TeacherSet.from_models(models, ["a", "b"])
    raw = data.mnist1d_splits(300, meta_samples=100, cache_dir=tmp_path)
    split = data.task_splits(raw, data.signal_transform())
    cache = training.TeacherLogitsCache(tmp_path / "logits")
    first = cache.logits(teachers, split["meta"], "meta-v1", show_progress=False)
    assert first.shape == (2, 100, 10) and len(list((tmp_path / "logits").glob("*.safetensors"))) == 2
    with torch.no_grad():
        expected = models[1](data.tensors(split["meta"])[0]).logits
    torch.testing.assert_close(first[1], expected)

    monkeypatch.setattr(TeacherSet, "model", lambda self, i: pytest.fail("cache miss"))
    torch.testing.assert_close(cache.logits(teachers, split["meta"], "meta-v1", show_progress=False), first)
    monkeypatch.undo()
    cache.logits(teachers, split["meta"], "meta-v2", show_progress=False)  # other data: new files
    assert len(list((tmp_path / "logits").glob("*.safetensors"))) == 4
    # a truncated file, and one whose logits turned NaN, are computed again (with a warning) and replaced
    a_path, b_path = (cache.path(info.identity, "meta-v1") for info in teachers.infos)
    a_path.write_bytes(a_path.read_bytes()[:100])
    save_file({"logits": torch.full((100, 10), float("nan"))}, b_path)
    with pytest.warns(UserWarning, match=r"are unusable \(.*\): computing them again") as caught:
        again = cache.logits(teachers, split["meta"], "meta-v1", show_progress=False)
    assert len(caught) == 2 and "NaN or inf values" in str(caught[1].message)
    torch.testing.assert_close(again, first)
    torch.testing.assert_close(load_file(b_path)["logits"], first[1])
    # a teacher whose finite weights overflow on the data has no distillation target: named, nothing cached
    with torch.no_grad():
        for param in models[1].parameters():
            param.mul_(1e25)  # two layers: logits near 1e50
    overflowing = TeacherSet.from_models(models, ["a", "b"])
    with pytest.raises(InvalidWeightsError, match=r"teacher 'b' gives NaN or inf logits on 100 of 100 rows"):
        cache.logits(overflowing, split["meta"], "meta-v3", show_progress=False)
    assert not cache.path(overflowing.infos[1].identity, "meta-v3").exists()


def test_recompute_bn_stats_matches_the_data():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    batches = [{"inputs": torch.randn(64, 3) * 3 + 1} for _ in range(4)]
    training.recompute_bn_stats(model, batches)
    with torch.no_grad():
        per_batch = [model[0](b["inputs"]) for b in batches]
    hidden = torch.cat(per_batch)
    torch.testing.assert_close(model[1].running_mean, hidden.mean(0), atol=1e-5, rtol=1e-5)
    # update_bn's cumulative average of each batch's unbiased variance
    expected_var = torch.stack([h.var(0) for h in per_batch]).mean(0)
    torch.testing.assert_close(model[1].running_var, expected_var, atol=1e-5, rtol=1e-5)
    assert not model.training and model[1].momentum == 0.1


@pytest.mark.parametrize("shared_init", [False, True])
def test_pool_is_hub_format_with_license_and_shared_init_variant(tmp_path, shared_init):
    from huggingface_hub import ModelCard

    from weightformer_hf import pool

    spec = pool.PoolSpec(model={"model_type": "wf_mlp", "hidden_sizes": [16]}, num_teachers=2, train_steps=2,
                         batch_size=32, shared_init=shared_init)  # fmt: skip
    x, y = torch.randn(64, 40), torch.randint(0, 10, (64,))
    paths = pool.build_pool(spec, (x, y), (x, y), data.DIGIT_NAMES, tmp_path / "pool", show_progress=False)
    assert pool.pool_is_built(spec, tmp_path / "pool", "mnist1d")
    assert pool.teacher_paths(tmp_path / "pool") == paths
    for path in paths:
        assert {"config.json", "model.safetensors", "README.md"} <= {p.name for p in path.iterdir()}
        assert ModelCard.load(path / "README.md").data.license == "apache-2.0"
    teachers = pool.load_pool(paths)
    first, second = (teachers.state_dicts[i]["net.0.weight"] for i in range(2))
    # Two tiny steps barely move the weights: a shared initialisation stays nearly identical.
    assert ((first - second).abs().max() < 0.05) == shared_init


def test_student_tensors_stay_fp32_under_bf16_autocast():
    from weightformer_hf import WeightFormerModel

    torch.manual_seed(0)
    models = [MLPClassifier(MLPClassifierConfig(hidden_sizes=(8,), id2label=LABELS)) for _ in range(3)]
    teachers = TeacherSet.from_models(models)
    generator = WeightFormerModel.for_teachers(teachers, hidden_size=16, num_attention_heads=2, intermediate_size=32)
    student_logits, teacher_logits = torch.randn(4, 10, dtype=torch.bfloat16), torch.randn(3, 4, 10)
    labels = torch.zeros(4, dtype=torch.long)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        state = generator(teachers, anchor=1).student_state
        loss = training.kd_loss(student_logits, teacher_logits, labels, 0.9, 4.0)
    # the residual addition happens in fp32: an untrained generator still gives the anchor bit for bit
    anchor = models[1].state_dict()
    assert state.keys() == anchor.keys()
    assert all(v.dtype == torch.float32 and torch.equal(v, anchor[k]) for k, v in state.items())
    assert loss.dtype == torch.float32
    assert torch.equal(loss, training.kd_loss(student_logits.float(), teacher_logits, labels, 0.9, 4.0))


def test_train_generator_names_a_dataloader_without_full_batches():
    from torch.utils.data import DataLoader

    from weightformer_hf import WeightFormerError

    loader = DataLoader(list(range(3)), batch_size=8, drop_last=True)  # 3 examples, batches of 8: none
    with pytest.raises(WeightFormerError, match="yields no batches: .* than the 3 examples"):
        training.train_generator(None, None, None, None, loader, None, None, None, 1, None)


def test_batched_split_loader_yields_the_plain_loaders_batches(tmp_path, monkeypatch):
    from torch.utils.data import DataLoader

    splits = data.mnist1d_splits(num_samples=300, meta_samples=100, cache_dir=tmp_path)
    meta = data.task_splits(splits, data.signal_transform())["meta"]

    def batches(dataset):
        loader = DataLoader(dataset, batch_size=32, shuffle=True, drop_last=True, collate_fn=data.collate,
                            generator=torch.Generator().manual_seed(0))  # fmt: skip
        return [batch for _ in range(2) for batch in loader]

    # 100 rows of 40 float32 inputs, an int64 label and an int64 index: 17,600 bytes, at or over the budget
    in_memory, from_arrow = data.BatchedSplit(meta, max_bytes=17_600), data.BatchedSplit(meta, max_bytes=17_599)
    plain = batches(meta)
    assert plain[0]["index"].tolist() != list(range(32))  # shuffled
    for split in (in_memory, from_arrow):
        batched = batches(split)
        assert len(plain) == len(batched) == 6
        for a, b in zip(plain, batched):
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
        row = split[3]
        assert row.keys() == meta[3].keys() and all(torch.equal(row[k], meta[3][k]) for k in row)
    assert in_memory._rows is not None and in_memory._rows.columns["inputs"].shape == (100, 40)
    assert from_arrow._sized and from_arrow._rows is None
    # in DataLoader workers (new ones every epoch) the batches are read from Arrow, each worker its share
    loader = DataLoader(data.BatchedSplit(meta, max_bytes=17_600), batch_size=32, shuffle=True, drop_last=True,
                        collate_fn=data.collate, generator=torch.Generator().manual_seed(0), num_workers=1)  # fmt: skip
    for a, b in zip(plain, [batch for _ in range(2) for batch in loader]):
        assert all(torch.equal(a[k], b[k]) for k in a)
    in_worker = data.BatchedSplit(meta, max_bytes=17_600)
    monkeypatch.setattr(torch.utils.data, "get_worker_info", lambda: object())  # as inside a worker
    assert torch.equal(in_worker.__getitems__([4, 2])["inputs"], meta[[4, 2]]["inputs"])
    assert not in_worker._sized and in_worker._rows is None


@pytest.mark.parametrize("settings", [
    {"num_samples": 1234, "train_split": 2 / 3, "seed": 7},  # not a multiple of 10: 123 per class
    {"num_samples": 600, "train_split": 1.0, "seed": 77, "scale_coeff": 0.6, "max_translation": 60,
     "corr_noise_scale": 0.4},  # the fine-tune pools' base task
    {"num_samples": 300, "train_split": 0.5, "seed": 1, "shuffle_seq": True, "padding": [20, 30]},
])  # fmt: skip
def test_mnist1d_draw_gives_mnist1ds_own_values_bit_for_bit(settings):
    from mnist1d.data import get_dataset_args, make_dataset

    from weightformer_hf import mnist1d_draw

    args = get_dataset_args()
    for name, value in settings.items():
        setattr(args, name, value)
    expected, got = make_dataset(args), mnist1d_draw.make_dataset(args)
    for key in ("x", "y", "x_test", "y_test"):
        assert got[key].dtype == expected[key].dtype and np.array_equal(got[key], expected[key]), key
    assert len(got["x"]) == int(settings["num_samples"] // 10 * 10 * settings["train_split"])


def test_tensor_rows_index_all_rows_or_a_subset_a_row_or_a_batch_at_a_time():
    columns = {"inputs": torch.arange(20.0).view(10, 2), "labels": torch.arange(10) % 3}
    whole, subset = data.TensorRows(columns), data.TensorRows(columns, range(9, 2, -2))  # rows 9, 7, 5, 3
    assert (len(whole), len(subset)) == (10, 4)
    assert whole[4]["inputs"].tolist() == [8.0, 9.0] and int(whole[4]["labels"]) == 1
    assert subset[1]["inputs"].tolist() == [14.0, 15.0] and int(subset[1]["labels"]) == 1  # row 7
    batch = subset.__getitems__([3, 0])  # rows 3 and 9
    assert batch["inputs"].tolist() == [[6.0, 7.0], [18.0, 19.0]] and batch["labels"].tolist() == [0, 0]
    assert whole.__getitems__([0, 9])["labels"].tolist() == [0, 0]


def test_teacher_labels_must_mean_the_datasets_classes():
    from datasets import ClassLabel, Dataset, Features, Value

    from weightformer_hf.errors import TeacherMismatchError

    zoo = Features({"label": ClassLabel(names=["cat", "dog", "emu"])})
    named = Dataset.from_dict({"label": [0, 1, 2]}, features=zoo)
    data.check_labels(["cat", "dog", "emu"], named, "zoo")
    data.check_labels(["0", "1", "2"], named, "zoo")  # generic names say nothing: only the count is checked
    data.check_labels(["LABEL_0", "LABEL_1", "LABEL_2"], named, "zoo")
    with pytest.raises(TeacherMismatchError, match=r"in another order"):
        data.check_labels(["dog", "cat", "emu"], named, "zoo")
    with pytest.raises(TeacherMismatchError, match=r"\['cat', 'dog', 'yak'\] \(3 classes\) do not match dataset 'zoo'"):
        data.check_labels(["cat", "dog", "yak"], named, "zoo")
    with pytest.raises(TeacherMismatchError, match=r"different classes"):
        data.check_labels(["0", "1"], named, "zoo")
    ids = Dataset.from_dict({"label": [0, 4]}, features=Features({"label": Value("int64")}))
    data.check_labels([str(i) for i in range(5)], ids, "ids")
    with pytest.raises(TeacherMismatchError, match=r"label ids 0..4, but the teachers have 3 classes"):
        data.check_labels(["a", "b", "c"], ids, "ids")


def test_the_same_classes_in_another_order_are_renumbered_to_the_teachers():
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Value

    zoo = Features({"label": ClassLabel(names=["cat", "dog", "emu"]), "x": Value("int64")})
    splits = DatasetDict({
        "train": Dataset.from_dict({"label": [0, 1, 2, 1], "x": [10, 11, 12, 13]}, features=zoo),
        "test": Dataset.from_dict({"label": [2, 0], "x": [20, 21]}, features=zoo),
    })  # fmt: skip
    teachers = ["dog", "emu", "cat"]
    aligned = data.align_labels(teachers, splits)
    assert aligned["train"]["label"] == [2, 0, 1, 0] and aligned["test"]["label"] == [1, 2]
    assert aligned["train"]["x"] == [10, 11, 12, 13]  # rows stay where they were
    assert aligned["train"].features["label"].names == teachers
    data.check_labels(teachers, aligned["train"], "zoo")
    for same in (["cat", "dog", "emu"], ["0", "1", "2"], ["cat", "dog", "yak"]):  # nothing to renumber
        assert data.align_labels(same, splits) is splits
    twins = Dataset.from_dict({"label": [0, 1]}, features=Features({"label": ClassLabel(names=["A", "a"])}))
    assert data.align_labels(["a", "A"], DatasetDict({"train": twins}))["train"]["label"] == [1, 0]  # by exact name


def test_an_unreadable_cached_dataset_names_the_folder_to_delete(tmp_path):
    data.mnist1d_splits(300, meta_samples=100, cache_dir=tmp_path)
    (cached,) = [p for p in tmp_path.iterdir() if p.name.startswith("mnist1d-")]
    (cached / "dataset_dict.json").write_text("{")
    with pytest.raises(data.DataError, match=rf"the cached dataset '{cached}' is unreadable .*delete that folder"):
        data.mnist1d_splits(300, meta_samples=100, cache_dir=tmp_path)
