"""Memory of teacher loading and generation: nothing read twice, nothing kept, no second copy of a student."""

from __future__ import annotations

import timm
import torch
from families import make_model

import weightformer_hf as wf
from weightformer_hf.hub import load_teachers
from weightformer_hf.weight_files import LazySafetensorsStateDict


def _saved(tmp_path, n=2):
    paths = []
    for seed in range(n):
        path = tmp_path / f"t{seed}"
        timm.models.save_for_hf(make_model("timm_resnet", seed), str(path), safe_serialization=True)
        paths.append(str(path))
    return paths


def test_lazy_mapping_reads_fresh_tensors_and_keeps_none(tmp_path):
    teachers = load_teachers(_saved(tmp_path))
    sd = teachers.state_dicts[1]
    assert isinstance(sd, LazySafetensorsStateDict)
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
