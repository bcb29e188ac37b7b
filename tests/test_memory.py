"""Memory of teacher loading and generation: nothing read twice, nothing kept, no second copy of a student."""

from __future__ import annotations

import pytest
import timm
import torch
from families import SMALL, make_model, perturb

import weightformer_hf as wf
from weightformer_hf.hub import load_teachers
from weightformer_hf.weight_files import LazySafetensorsStateDict, is_lazy


def _saved(tmp_path, n=2, dtype=torch.float32):
    paths = []
    for seed in range(n):
        path = tmp_path / f"t{seed}"
        timm.models.save_for_hf(make_model("timm_resnet", seed).to(dtype), str(path), safe_serialization=True)
        paths.append(str(path))
    return paths


def test_lazy_mapping_reads_fresh_tensors_and_keeps_none(tmp_path):
    teachers = load_teachers(_saved(tmp_path))
    sd = teachers.state_dicts[1]
    assert isinstance(sd, LazySafetensorsStateDict) and is_lazy(sd)
    assert not is_lazy(dict(sd)) and not is_lazy(make_model("timm_resnet", 1).state_dict())
    name = next(iter(sd))
    first, second = sd[name], sd[name]
    assert torch.equal(first, second) and first.data_ptr() != second.data_ptr()
    assert sd.shape(name) == tuple(first.shape)
    expected = make_model("timm_resnet", 1).state_dict()
    assert all(torch.equal(sd[k], v) for k, v in expected.items())


def test_template_is_built_on_meta_and_students_take_the_generated_tensors(tmp_path):
    teachers = load_teachers(_saved(tmp_path))
    assert next(teachers._build_on_meta().parameters()).is_meta
    assert next(teachers.template.parameters()).device.type == "cpu"
    state = {k: teachers.state_dicts[0][k] for k in teachers.shapes}
    student = teachers.build_student(state)
    for name, tensor in student.state_dict().items():
        assert tensor.data_ptr() == state[name].data_ptr(), name  # no second copy


def test_in_memory_teachers_are_never_aliased_by_students():
    models = [make_model("timm_resnet", seed) for seed in range(2)]
    teachers = wf.TeacherSet.from_models(models)
    model = teachers.model(0)
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    assert torch.equal(next(iter(teachers.state_dicts[0].values())), next(models[0].parameters()))
    assert not torch.equal(next(model.parameters()), next(models[0].parameters()))


def test_nan_check_streams_blocks(tmp_path):
    from weightformer_hf.teachers import _non_finite

    t = torch.zeros(10_000)
    assert _non_finite(t, block=1000) is None
    t[9_999] = float("inf")
    assert _non_finite(t, block=1000) == "inf"
    t[5] = float("nan")
    assert _non_finite(t, block=1000) == "NaN"
    assert _non_finite(torch.arange(3)) is None


def test_nan_check_reads_rows_in_blocks_and_finds_the_last_one(tmp_path):
    from weightformer_hf.teachers import _non_finite_rows

    w = torch.zeros(100, 10)
    assert _non_finite_rows({"w": w}, "w", (100, 10), block=50) is None
    w[99, 9] = float("inf")
    assert _non_finite_rows({"w": w}, "w", (100, 10), block=50) == "inf"
    model = make_model("timm_resnet", 0)
    with torch.no_grad():
        model.fc.weight[-1, -1] = float("nan")
    timm.models.save_for_hf(model, str(tmp_path / "t"), safe_serialization=True)
    from weightformer_hf.weight_files import LazySafetensorsStateDict

    sd = LazySafetensorsStateDict(tmp_path / "t", ["model.safetensors"], "t")
    assert _non_finite_rows(sd, "fc.weight", tuple(model.fc.weight.shape), block=7) == "NaN"
    assert _non_finite_rows(sd, "fc.bias", tuple(model.fc.bias.shape), block=7) is None


# ------------------------------------------------------------------------------ streamed generation
@pytest.mark.parametrize("family", ["cnn1d", "timm_vgg", "timm_vit"])
def test_row_blocks_permuted_apart_rebuild_the_permuted_tensor(family):
    """What generation does with wide tensors: each block of source rows, its other axes permuted, lands on
    the rows `argsort(perm)` of the aligned tensor; blocks of any size rebuild `permute_tensor` exactly."""
    from weightformer_hf.alignment import permute_tensor, permute_trailing, rows_are_channels

    teachers = wf.TeacherSet.from_models([make_model(family, 0)])
    spec = teachers.family.permutation_spec(teachers.template)
    sizes = {}
    for name, (groups, reshape) in spec.items():
        shape = reshape if reshape is not None else tuple(teachers.shapes[name])
        sizes.update({g: shape[a] for a, g in enumerate(groups) if g is not None})
    generator = torch.Generator().manual_seed(0)
    perms = {g: torch.randperm(n, generator=generator) for g, n in sizes.items()}
    changed = 0
    for name in spec:
        tensor = teachers.state_dicts[0][name]
        full = permute_tensor(name, tensor, spec, perms)
        changed += not torch.equal(full, tensor)
        rows = tensor.shape[0]
        assert rows_are_channels(name, spec, rows)
        group = spec[name][0][0]
        landing = torch.argsort(perms[group]) if group is not None else torch.arange(rows)
        for block in (1, 3, rows):
            rebuilt = torch.full_like(tensor, float("nan"))
            for r in range(0, rows, block):
                moved = permute_trailing(name, tensor[r : r + block], spec, perms)
                rebuilt.index_copy_(0, landing[r : r + block], moved)
            assert torch.equal(rebuilt, full), (name, block)
    assert changed >= 3  # (fresh norms are constant: permuting them changes nothing)


def test_lazy_rows_are_read_alone_and_match_the_tensor(tmp_path):
    from weightformer_hf.weight_files import tensor_rows

    model = make_model("timm_resnet", 0).to(torch.bfloat16)
    timm.models.save_for_hf(model, str(tmp_path / "t"), safe_serialization=True)
    sd = load_teachers([str(tmp_path / "t")]).state_dicts[0]
    for name, tensor in model.state_dict().items():
        if not tensor.dim():
            continue
        rows = tensor.shape[0]
        for start, stop in ((0, rows), (1, 3), (rows - 1, rows + 4)):
            got = tensor_rows(sd, name, start, stop)
            assert got.dtype == tensor.dtype and torch.equal(got, tensor[start:stop]), name
    assert torch.equal(tensor_rows(dict(model.state_dict()), "fc.weight", 2, 4), model.fc.weight[2:4])


@pytest.fixture
def one_thread():
    """One intra-op thread: with more, GEMMs of different row counts (a chunk's, all chunks') may sum in other
    orders. (At 2 threads the streamed classifier of the test below differed from the cached one by 7e-9.)"""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize(
    "dtype,options,block_bytes",
    [(torch.float32, {}, {}), (torch.bfloat16, {}, {}), (torch.float32, {"cross_attention": "all"}, {}),
     (torch.float32, {}, {"ALIGNED_BLOCK_BYTES": 16 * 3 * 32 * 4})],  # the aligned attention in 16-channel blocks
)  # fmt: skip
def test_lazy_teachers_stream_layer_by_layer_and_give_the_in_memory_student(
    tmp_path, monkeypatch, dtype, options, block_bytes, one_thread
):
    from weightformer_hf.modeling import modeling_weightformer as mw

    for name, value in block_bytes.items():
        monkeypatch.setattr(mw, name, value)
    paths = _saved(tmp_path, n=3, dtype=dtype)
    lazy = load_teachers(paths)
    eager = lazy.to("cpu")  # the same teachers, read into memory
    assert all(isinstance(sd, dict) for sd in eager.state_dicts)
    # chunks of 8: most layers have several, which a streamed layer runs through the blocks one at a time
    generator = wf.WeightFormerModel.for_teachers(lazy, **SMALL, chunk_size=8, **options)
    assert max(mw.chunk_layout(w["width"], 8)[0] for w in generator.config.student_layers) > 4
    perturb(generator)
    mw.clear_token_cache()
    expected = generator.generate_student(eager, anchor=1).state_dict()
    assert len(mw._TOKEN_CACHE) == 1  # in-memory teachers are cached...
    mw.clear_token_cache()
    monkeypatch.setattr(mw, "_BLOCK_BYTES", 64)  # ...lazy ones are streamed, wide tensors in many row blocks
    monkeypatch.setattr(mw, "_BLOCK_MIN_ROWS", 1)
    built = []
    original = mw.WeightFormerModel._generate_layer

    def spy(self, index, layer, inputs, anchor, cross):
        out = original(self, index, layer, inputs, anchor, cross)
        built.append((inputs.streamed, inputs.content, inputs.anchor_tensors))
        return out

    monkeypatch.setattr(mw.WeightFormerModel, "_generate_layer", spy)
    streamed = generator.generate_student(lazy, anchor=1).state_dict()
    assert len(mw._TOKEN_CACHE) == 0
    assert len(built) == len(lazy.layers[0]) and all(b == (True, None, None) for b in built)  # content dropped
    assert set(streamed) == set(expected)
    for name, tensor in expected.items():
        assert streamed[name].dtype == tensor.dtype, name
        assert torch.equal(streamed[name], tensor), name
    assert any(not torch.equal(streamed[n], lazy.state_dicts[1][n]) for n in streamed)  # it did generate


def test_streamed_students_read_the_anchors_wide_tensors_by_rows_only(tmp_path, monkeypatch):
    """Applying a streamed layer's changes reads the anchor's row-major tensors a block of rows at a time (no
    float32 copy of a whole tensor beside the decrements and the new tensor); only the small or not
    row-major ones (norms, statistics) are read whole."""
    lazy = load_teachers(_saved(tmp_path, n=2))
    generator = wf.WeightFormerModel.for_teachers(lazy, **SMALL)
    perturb(generator)
    generator.generate_student(lazy, anchor=0)  # alignment (which reads tensors whole) is now cached
    anchor_state, whole = lazy.state_dicts[0], []
    original = LazySafetensorsStateDict.__getitem__

    def spy(self, name):
        if self is anchor_state:
            whole.append(name)
        return original(self, name)

    monkeypatch.setattr(LazySafetensorsStateDict, "__getitem__", spy)
    generator.generate_student(lazy, anchor=0)
    row_major = {t.name for layer in lazy.layers[0] for t in layer.tensors if t.channel_axis == 0 and not t.positive}
    assert {"layer1.0.conv1.weight", "fc.weight"} <= row_major
    assert whole and not row_major & set(whole)  # (the streamed first pass and the tokens read rows too)


def test_a_streamed_layer_holds_one_teachers_raw_tokens_at_a_time(tmp_path):
    """Streamed generation builds each teacher's raw tokens, embeds them and lets them go before it builds the
    next teacher's; a cached layer holds all K (the memory `examples/large_generation.py` measures)."""
    import weakref

    from weightformer_hf.modeling import modeling_weightformer as mw

    lazy = load_teachers(_saved(tmp_path, n=3))
    generator = wf.WeightFormerModel.for_teachers(lazy, **SMALL)
    alive, built = [], []
    original = mw._write_raw_tokens

    def spy(layer, state, perm, spec, device, out, sums):
        original(layer, state, perm, spec, device, out, sums)
        if out is not None:  # (the streamed first pass only sums squares)
            # the layer's earlier teachers' raw tokens still in memory (by storage: the cached path writes views)
            alive.append(sum(ref() is not None for name, ref in built if name == layer.name))
            built.append((layer.name, weakref.ref(out if out._base is None else out._base)))

    mw.clear_token_cache()
    mw._write_raw_tokens = spy
    try:
        generator.generate_student(lazy, anchor=0)
        layers = len(lazy.layers[0])
        assert len(built) == 3 * layers and max(alive) == 0
        built.clear(), alive.clear()
        generator.generate_student(lazy.to("cpu"), anchor=0)  # in memory: cached, all K raw tokens kept
        assert len(built) == 3 * layers and max(alive) == 2
    finally:
        mw._write_raw_tokens = original
        mw.clear_token_cache()
