"""Teacher pools: the fine-tune regime, resuming an interrupted build, and the named errors."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from weightformer_hf import data, pool
from weightformer_hf.errors import WeightFormerError

MLP = {"model_type": "wf_mlp", "hidden_sizes": [8]}


def _data(n=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 40, generator=g), torch.randint(10, (n,), generator=g)


def _spec(**kw):
    base = dict(model=MLP, num_teachers=4, train_steps=6, batch_size=16, chunk_size=1)
    return pool.PoolSpec(**{**base, **kw})


def test_finetune_pool_saves_the_base_and_starts_every_teacher_from_it(tmp_path):
    spec = _spec(regime="finetune", base_steps=20, finetune_steps=(2, 4), finetune_log10_lr=(-3.0, -2.9))
    train = _data()
    paths = pool.build_pool(spec, train, train, data.DIGIT_NAMES, tmp_path, show_progress=False, source=_data(seed=1))
    manifest = json.loads((tmp_path / "pool.json").read_text())
    assert manifest["base"] == "base" and (tmp_path / "base" / "model.safetensors").exists()
    base = load_file(tmp_path / "base" / "model.safetensors")
    for path, recipe in zip(paths, manifest["recipes"]):
        assert recipe["steps"] in (2, 4) and 10**-3.0 <= recipe["learning_rate"] <= 10**-2.9
        weights = load_file(path / "model.safetensors")
        # at most 4 AdamW steps of lr <= 10^-2.9 from the base: every entry moved by at most 4 * lr (+ decay)
        assert all((weights[k] - base[k]).abs().max() <= 4 * 10**-2.9 * 1.01 + 1e-6 for k in base)
        assert any(not torch.equal(weights[k], base[k]) for k in base)
    assert pool.teacher_paths(tmp_path) == paths  # the base is not a teacher


def test_only_teachers_trained_together_use_the_callers_threads(tmp_path, monkeypatch):
    """vmap splits its batched matmuls by model, so those keep their bits on more threads; the base and a chunk
    of one train one model at a time, whose bits a second thread changes: they run on one."""
    seen, train_models = [], pool.train_models

    def recording(models, *args, **kwargs):
        seen.append((len(models), torch.get_num_threads()))
        return train_models(models, *args, **kwargs)

    monkeypatch.setattr(pool, "train_models", recording)
    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        spec = _spec(regime="finetune", num_teachers=5, chunk_size=2, base_steps=2, finetune_steps=(2,))
        pool.build_pool(spec, _data(), _data(), data.DIGIT_NAMES, tmp_path, show_progress=False, source=_data(seed=1))
        assert torch.get_num_threads() == 3  # the caller's count is back
    finally:
        torch.set_num_threads(threads)
    assert seen == [(1, 1), (2, 3), (2, 3), (1, 1)]  # the base, two chunks of two, the last teacher alone

    seen.clear()  # BatchNorm teachers train one by one even in a chunk: one thread
    resnet = {"timm": "resnet10t", "in_chans": 1, "channels": [4, 4, 4, 4], "stem_width": 4}
    g = torch.Generator().manual_seed(0)
    images = torch.randn(32, 1, 32, 32, generator=g), torch.randint(10, (32,), generator=g)
    torch.set_num_threads(3)
    try:
        pool.build_pool(_spec(model=resnet, num_teachers=2, chunk_size=2, train_steps=1), images, images,
                        data.DIGIT_NAMES, tmp_path / "resnet", "mnist5k", show_progress=False)  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    assert seen == [(2, 1)]


def test_interrupted_build_keeps_finished_teachers_and_redoes_the_rest_identically(tmp_path):
    spec, train = _spec(), _data()
    pool.build_pool(spec, train, train, data.DIGIT_NAMES, tmp_path, show_progress=False)
    first = {p.name: load_file(p / "model.safetensors") for p in pool.teacher_paths(tmp_path)}
    kept = (tmp_path / "teacher-00" / "model.safetensors").stat().st_mtime_ns
    shutil.rmtree(tmp_path / "teacher-02")  # as if killed before teacher 2 was saved
    (tmp_path / "pool.json").unlink()
    assert not pool.pool_is_built(spec, tmp_path, "mnist1d")
    pool.build_pool(spec, train, train, data.DIGIT_NAMES, tmp_path, show_progress=False)
    assert (tmp_path / "teacher-00" / "model.safetensors").stat().st_mtime_ns == kept
    again = load_file(tmp_path / "teacher-02" / "model.safetensors")
    assert all(torch.equal(again[k], first["teacher-02"][k]) for k in again)
    assert pool.pool_is_built(spec, tmp_path, "mnist1d")
    other = _spec(train_steps=7)  # another spec: nothing of the old build is reused
    pool.build_pool(other, train, train, data.DIGIT_NAMES, tmp_path, show_progress=False)
    assert (tmp_path / "teacher-00" / "model.safetensors").stat().st_mtime_ns != kept


def test_pool_errors_name_the_problem(tmp_path):
    with pytest.raises(WeightFormerError, match="unknown pool regime 'soup'"):
        _spec(regime="soup")
    with pytest.raises(WeightFormerError, match="needs source data to pretrain its base"):
        pool.build_pool(_spec(regime="finetune"), _data(), _data(), data.DIGIT_NAMES, tmp_path, show_progress=False)
    with pytest.raises(data.DataError, match="mnist1d has no generator argument 'scale'"):
        data.mnist1d_tensors(10, 0, scale=0.5)


def test_a_folder_that_is_no_pool_is_never_emptied_and_broken_or_repeated_teachers_are_named(tmp_path):
    user = tmp_path / "mine"
    (user / "notes").mkdir(parents=True)
    (user / "notes" / "todo.txt").write_text("keep")
    with pytest.raises(WeightFormerError, match="is not empty and holds no pool this library built"):
        pool.build_pool(_spec(), _data(), _data(), data.DIGIT_NAMES, user, show_progress=False)
    assert [p.name for p in user.iterdir()] == ["notes"] and (user / "notes" / "todo.txt").read_text() == "keep"
    built = tmp_path / "built"
    paths = pool.build_pool(_spec(), _data(), _data(), data.DIGIT_NAMES, built, show_progress=False)
    # a teacher given twice, or a copy of it under another name, could train and sit in a held-out set at once
    with pytest.raises(WeightFormerError, match="teacher-00' and '.*teacher-00' are the same model"):
        pool.load_pool([paths[0], paths[1], paths[0]])
    shutil.copytree(paths[1], tmp_path / "copy")
    with pytest.raises(WeightFormerError, match="teacher-01' and '.*copy' are the same model"):
        pool.load_pool([paths[1], tmp_path / "copy"])
    (built / "pool.json").write_text('{"teachers": [')
    with pytest.raises(WeightFormerError, match="pool.json is corrupt"):
        pool.teacher_paths(built)
    (built / "pool.json").unlink()  # without a manifest every model folder counts: a broken one is named
    (paths[2] / "config.json").unlink()
    with pytest.raises(WeightFormerError, match="'teacher-02' hold weights but no config.json"):
        pool.expand_sources([built])


def test_the_default_training_preset_builds_a_finetune_pool_from_its_base(tmp_path):
    """`examples/train.py`'s default preset is a fine-tune pool: `resolve_pool` pretrains the base on the
    preset's source task and fine-tunes every teacher from it."""
    from weightformer_hf.hub_configs import load_preset

    preset = load_preset("mnist1d-mlp-finetune")
    assert preset["pool"]["regime"] == "finetune"
    tiny = {
        **preset["pool"],
        "model": {**MLP, "in_features": 40},
        "num_teachers": 3,
        "base_steps": 4,
        "finetune_steps": [2],
        "chunk_size": 3,
        "base_data": {**preset["pool"]["base_data"], "num_samples": 300},
    }
    raw = data.load_raw_splits("mnist1d", mnist1d={"num_samples": 600, "seed": 0, "meta_samples": 100})
    teachers = pool.resolve_pool(None, {"pool": tiny}, "tiny-finetune", raw, "mnist1d", tmp_path / "pool")
    assert len(teachers) == 3 and (tmp_path / "pool" / "base" / "model.safetensors").exists()
    base = load_file(tmp_path / "pool" / "base" / "model.safetensors")
    for state in teachers.state_dicts:  # two AdamW steps from the base: close to it, not equal
        assert all((state[k] - base[k]).abs().max() <= 2 * 10**-2.5 * 1.01 + 1e-6 for k in base)
        assert any(not torch.equal(state[k], base[k]) for k in base)


def test_a_partial_base_data_keeps_the_default_source_task_for_the_rest():
    spec = pool.PoolSpec.from_dict({"regime": "finetune", "base_data": {"num_samples": 300}})
    assert spec.base_data == {**pool.DEFAULT_BASE_DATA, "num_samples": 300}
    assert pool.PoolSpec().base_data == pool.DEFAULT_BASE_DATA
    assert pool.PoolSpec().base_data is not pool.DEFAULT_BASE_DATA  # specs never share (and mutate) the default


def test_image_finetune_pools_pretrain_on_scikit_learns_digits():
    """The source task of MNIST-5k fine-tune pools: the 1,797 real 8×8 digits, upsampled to 28×28 and read
    through the teachers' transform; a dataset without a source task is refused by name."""
    from sklearn.datasets import load_digits

    raw = load_digits()
    splits = data.digits_splits()
    first = splits["train"][0]
    assert len(splits["train"]) == 1797 and first["image"].size == (28, 28) and first["image"].mode == "L"
    # the upsampling keeps the digit, upright: shrunk back to 8×8 it matches its source, not the source transposed
    big = torch.as_tensor(np.asarray(first["image"]), dtype=torch.float32).view(1, 1, 28, 28)
    small = torch.nn.functional.interpolate(big, size=(8, 8), mode="area").flatten()
    source = torch.as_tensor(raw.images[0], dtype=torch.float32)
    corr = [float(torch.corrcoef(torch.stack([small, s.flatten()]))[0, 1]) for s in (source, source.T)]
    assert first["label"] == raw.target[0] and corr[0] > 0.95 > corr[1]
    assert 0 <= float(big.min()) and float(big.max()) <= 255.0 * float(source.max()) / 16
    transform = data.Transform(lambda ims: torch.stack([torch.zeros(1, 28, 28) + im.getpixel((14, 14)) for im in ims]),
                               "centre-pixel")  # fmt: skip
    x, y = pool.finetune_source(_spec(regime="finetune"), "mnist5k", transform)
    assert x.shape == (1797, 1, 28, 28) and torch.equal(y, torch.as_tensor(raw.target))
    assert float(x[0, 0, 0, 0]) == splits["train"][0]["image"].getpixel((14, 14))
    with pytest.raises(WeightFormerError, match="source task for mnist1d and mnist5k only, not for 'cifar10'"):
        pool.finetune_source(_spec(regime="finetune"), "cifar10", transform)


def test_an_image_finetune_pool_records_its_source_task(tmp_path):
    spec = _spec(num_teachers=1, regime="finetune", base_steps=2, finetune_steps=(2,))
    pool.build_pool(spec, _data(), _data(), data.DIGIT_NAMES, tmp_path, "mnist5k", show_progress=False,
                    source=_data(seed=1))  # fmt: skip
    base = json.loads((tmp_path / "base" / pool.RECORD).read_text())
    assert base["source"] == "scikit-learn's 8x8 digits upsampled to 28x28"
    card = (tmp_path / "teacher-00" / "README.md").read_text()
    assert "pretrained 2 steps on scikit-learn's 8x8 digits upsampled to 28x28" in card
    # a dataset the library has no source task for: the caller's source is used and named as such
    pool.build_pool(spec, _data(), _data(), data.DIGIT_NAMES, tmp_path / "other", "cifar10", show_progress=False,
                    source=_data(seed=1))  # fmt: skip
    assert json.loads((tmp_path / "other" / "base" / pool.RECORD).read_text())["source"] == (
        "a source task given by the caller"
    )
    assert "steps on a source task given by the caller" in (tmp_path / "other" / "teacher-00" / "README.md").read_text()


def test_an_untrained_timm_teacher_records_its_constructor_arguments():
    """`new_teacher` records a timm model's keyword arguments as `family.build` does, so a set of such models
    in memory (the benchmark's `--step_costs_only`) rebuilds them at their own widths."""
    import weightformer_hf as wf

    model = {"timm": "resnet10t", "in_chans": 1, "channels": [8, 16, 32, 64], "stem_width": 8}
    teachers = wf.TeacherSet.from_models([pool.new_teacher(pool.PoolSpec(model=model), list("ab"), seed=s)
                                          for s in range(2)])  # fmt: skip
    assert teachers.model(1).weightformer_model_args == {"in_chans": 1, "channels": [8, 16, 32, 64], "stem_width": 8}
    assert teachers.shapes["conv1.0.weight"] == (6, 1, 3, 3) and teachers.shapes["fc.weight"] == (2, 64)  # not 24, 512
