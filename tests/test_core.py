"""The generator's contract (issue #2): exact anchor at init, full coverage, order-free, gradients, I/O."""

from __future__ import annotations

import os

import pytest
import torch
from families import ALL_FAMILIES, SMALL, bits, make_inputs, make_model, perturb
from transformers import AutoModel

import weightformer_hf as wf
from weightformer_hf.alignment import permute_tensor, weight_matching
from weightformer_hf.errors import InvalidWeightsError, TeacherMismatchError, UnsupportedArchitectureError


@pytest.fixture(scope="module", params=ALL_FAMILIES)
def family_teachers(request):
    family = request.param
    return family, [make_model(family, seed) for seed in range(3)]


def test_untrained_generator_returns_anchor_bit_for_bit(family_teachers):
    family, models = family_teachers
    teachers = wf.TeacherSet.from_models(models)
    generator = wf.WeightFormerModel.for_teachers(teachers, **SMALL)
    student = generator.generate_student(teachers, anchor=1)
    assert type(student) is type(models[1])
    expected = models[1].state_dict()
    got = student.state_dict()
    assert list(got) == list(expected)
    for name, tensor in expected.items():
        assert got[name].dtype == tensor.dtype and got[name].shape == tensor.shape, name
        assert torch.equal(bits(got[name]), bits(tensor)), name
    inputs = make_inputs(family)
    assert torch.equal(teachers.family.logits(student, inputs), teachers.family.logits(models[1], inputs))
    assert not student.training


def test_every_floating_tensor_is_generated(family_teachers):
    """Every parameter and float buffer belongs to exactly one generator layer; nothing is copied."""
    family, models = family_teachers
    teachers = wf.TeacherSet.from_models(models)
    layers, non_float = teachers.layers
    covered = [t.name for layer in layers for t in layer.tensors]
    state = models[0].state_dict()
    assert sorted(covered) == sorted(k for k, v in state.items() if v.is_floating_point())
    assert len(covered) == len(set(covered))
    assert all(not state[k].is_floating_point() for k in non_float)


def test_perturbed_generator_changes_every_tensor_and_keeps_shapes(family_teachers):
    family, models = family_teachers
    teachers = wf.TeacherSet.from_models(models)
    generator = wf.WeightFormerModel.for_teachers(teachers, **SMALL)
    perturb(generator)
    student = generator.generate_student(teachers, anchor=0)
    anchor = models[0].state_dict()
    for name, tensor in student.state_dict().items():
        assert tensor.shape == anchor[name].shape and tensor.dtype == anchor[name].dtype
        if tensor.is_floating_point():
            assert not torch.equal(tensor, anchor[name]), f"{name} was copied from the anchor"
            assert torch.isfinite(tensor).all()
        if name.endswith("running_var"):
            assert (tensor > 0).all()
    assert torch.isfinite(teachers.family.logits(student, make_inputs(family))).all()


@pytest.mark.parametrize(
    "family,options",
    [("mlp", {}), ("timm_resnet", {}), ("hf_vit", {}), ("mlp", {"cross_attention": "all"}),
     ("timm_resnet", {"cross_attention": "all"})],
)  # fmt: skip
def test_permuting_other_teachers_leaves_student_unchanged(family, options):
    models = [make_model(family, seed) for seed in range(5)]
    teachers = wf.TeacherSet.from_models(models)
    generator = wf.WeightFormerModel.for_teachers(teachers, **SMALL, **options)
    perturb(generator, seed=1)
    a = generator(teachers, anchor=2).student_state
    shuffled = teachers.subset([4, 0, 2, 1, 3])  # same anchor (teacher 2), others reordered
    b = generator(shuffled, anchor=2).student_state
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=name)
    c = generator(teachers.subset([0, 1, 3]), anchor=0).student_state
    assert any(not torch.allclose(a[n].float(), c[n].float()) for n in a if a[n].is_floating_point())


@pytest.mark.parametrize("k", [1, 2, 5, 8])
def test_any_number_of_teachers(k):
    models = [make_model("mlp", seed) for seed in range(k)]
    generator = wf.WeightFormerModel.for_teachers(models, **SMALL)
    perturb(generator)
    student = generator.generate_student(models, anchor=k - 1)
    assert torch.isfinite(student(make_inputs("mlp")).logits).all()
    # With the decoders' weights zeroed the change is each decoder's bias, in units of the tensor's RMS over
    # all k teachers (a symmetric function of the set, so alignment does not enter): computed here by hand.
    with torch.no_grad():
        for decoder in generator.decoders:
            decoder.weight.zero_()
    teachers = wf.TeacherSet.from_models(models)
    got = generator.generate_student(teachers, anchor=k - 1).state_dict()
    anchor = models[k - 1].state_dict()
    layers, _ = teachers.layers
    for index, layer in enumerate(layers):
        bias, start = generator.decoders[index].bias.detach(), 0
        for t in layer.tensors:
            stack = torch.stack([m.state_dict()[t.name] for m in models])
            rms = stack.pow(2).mean().sqrt().clamp_min(1e-6)
            moved = anchor[t.name].movedim(t.channel_axis, 0)
            width = moved[0].numel()
            change = bias[start : start + width].reshape(moved.shape[1:]) * rms
            start += width
            expected = (moved - change).movedim(0, t.channel_axis)
            torch.testing.assert_close(got[t.name], expected, rtol=1e-6, atol=1e-7, msg=t.name)
            assert not torch.equal(got[t.name], anchor[t.name]), t.name


def test_gradient_reaches_every_generator_parameter():
    models = [make_model("mlp", seed) for seed in range(3)]
    teachers = wf.TeacherSet.from_models(models)
    generator = wf.WeightFormerModel.for_teachers(teachers, **SMALL)
    inputs, labels = make_inputs("mlp", 8), torch.arange(8) % 10

    def grads():
        generator.zero_grad()
        state = generator(teachers, anchor=0).student_state
        loss = torch.nn.functional.cross_entropy(wf.run_student(teachers, state, inputs), labels)
        loss.backward()
        return {n: p.grad for n, p in generator.named_parameters()}

    # At exact initialisation the zero output layers block the gradient upstream.
    at_init = grads()
    for name, grad in at_init.items():
        if name.startswith("decoders."):
            assert grad is not None and grad.abs().sum() > 0, name
        else:
            assert grad is None or grad.abs().sum() == 0, name
    # After one optimisation step everything upstream learns too.
    torch.optim.SGD(generator.parameters(), lr=0.1).step()
    after = grads()
    for name, grad in after.items():
        assert grad is not None and grad.abs().sum() > 0, name


def test_generate_student_keeps_generator_mode():
    models = [make_model("mlp", seed) for seed in range(2)]
    generator = wf.WeightFormerModel.for_teachers(models, **SMALL)
    generator.train()
    generator.generate_student(models)
    assert generator.training
    generator.eval()
    generator.generate_student(models)
    assert not generator.training


def test_save_and_load_give_identical_students(tmp_path):
    models = [make_model("timm_resnet", seed) for seed in range(2)]
    teachers = wf.TeacherSet.from_models(models)
    generator = wf.WeightFormerModel.for_teachers(teachers, **SMALL)
    perturb(generator)
    generator.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]
    reloaded = wf.WeightFormerModel.from_pretrained(tmp_path)
    auto = AutoModel.from_pretrained(tmp_path)
    assert type(auto) is wf.WeightFormerModel
    assert reloaded.config.student == teachers.describe()
    expected = generator.generate_student(teachers, anchor=1).state_dict()
    for other in (reloaded, auto):
        for name, tensor in other.generate_student(teachers, anchor=1).state_dict().items():
            assert torch.equal(tensor, expected[name]), name


def test_mismatched_architectures_name_the_tensor():
    with pytest.raises(TeacherMismatchError, match=r"net\.2\.weight.*\(32, 16\).*teacher\[1\]"):
        wf.TeacherSet.from_models([make_model("mlp", 0), make_model("mlp", 1, hidden_sizes=(16, 32))])


def test_mixed_families_are_refused():
    with pytest.raises(TeacherMismatchError, match="mlp.*cnn1d|cnn1d.*mlp"):
        wf.TeacherSet.from_models([make_model("mlp", 0), make_model("cnn1d", 1)])


def test_different_class_counts_name_the_classifier():
    with pytest.raises(TeacherMismatchError, match=r"'fc\.weight'.*\(5, 512\).*teacher\[1\]"):
        wf.TeacherSet.from_models([make_model("timm_resnet", 0), make_model("timm_resnet", 1, num_classes=5)])


def test_same_labels_in_another_order_are_reordered():
    a, b = make_model("mlp", 0), make_model("mlp", 1)
    order = [3, 1, 4, 0, 5, 9, 2, 6, 8, 7]
    b.config.id2label = {i: str(order[i]) for i in range(10)}
    b.config.label2id = {str(order[i]): i for i in range(10)}
    teachers = wf.TeacherSet.from_models([a, b])
    x = make_inputs("mlp")
    reordered = teachers.model(1)(x).logits
    original = b(x).logits
    for i, label in enumerate(order):
        torch.testing.assert_close(reordered[:, label], original[:, i])


def test_different_label_sets_are_refused():
    a, b = make_model("mlp", 0), make_model("mlp", 1)
    b.config.id2label = {i: f"class{i}" for i in range(10)}
    with pytest.raises(TeacherMismatchError, match="teacher\\[1\\].*labels"):
        wf.TeacherSet.from_models([a, b])


def test_generator_for_other_architecture_names_both():
    generator = wf.WeightFormerModel.for_teachers([make_model("mlp", 0)], **SMALL)
    with pytest.raises(TeacherMismatchError, match="mlp.*timm_resnet|resnet10t"):
        generator.generate_student([make_model("timm_resnet", 0)])
    with pytest.raises(TeacherMismatchError, match=r"hidden_sizes: \[16, 16\] vs \[16, 32\]"):
        generator.generate_student([make_model("mlp", 0, hidden_sizes=(16, 32))])


def test_nan_weights_name_teacher_and_tensor():
    bad = make_model("mlp", 1)
    with torch.no_grad():
        bad.net[2].bias[3] = float("nan")
    with pytest.raises(InvalidWeightsError, match=r"teacher\[1\].*net\.2\.bias.*NaN"):
        wf.TeacherSet.from_models([make_model("mlp", 0), bad])


def test_unsupported_architecture_lists_families():
    with pytest.raises(UnsupportedArchitectureError, match="Sequential.*mlp.*timm_resnet"):
        wf.TeacherSet.from_models([torch.nn.Sequential(torch.nn.Linear(2, 2))])


@pytest.mark.parametrize("family", ["mlp", "timm_resnet", "hf_vit"])
def test_weight_matching_undoes_a_hidden_permutation(family):
    """A teacher that is a channel-permuted copy of the anchor is aligned back onto it exactly."""
    model = make_model(family, 0)
    teachers = wf.TeacherSet.from_models([model])
    spec = teachers.family.permutation_spec(teachers.template)
    state = model.state_dict()
    groups = {g for groups, _ in spec.values() for g in groups if g is not None}
    sizes = {}
    for name, (groups_, reshape) in spec.items():
        shape = reshape or state[name].shape
        sizes.update({g: shape[i] for i, g in enumerate(groups_) if g is not None})
    torch.manual_seed(0)
    true_perm = {g: torch.randperm(sizes[g]) for g in groups}
    permuted = {n: permute_tensor(n, t, spec, true_perm) for n, t in state.items()}
    x = make_inputs(family)
    copy = make_model(family, 0)
    copy.load_state_dict(permuted)
    torch.testing.assert_close(teachers.family.logits(copy, x), teachers.family.logits(model, x), rtol=1e-4, atol=1e-5)
    found = weight_matching(spec, state, permuted, max_iter=20)
    for name, tensor in state.items():
        assert torch.equal(permute_tensor(name, permuted[name], spec, found), tensor), name


def test_reference_model_with_other_class_count_reloads(tmp_path):
    from weightformer_hf.reference_models import MLPClassifier, MLPClassifierConfig

    labels = ["a", "b", "c", "d", "e"]
    model = MLPClassifier(
        MLPClassifierConfig(
            hidden_sizes=(8,), id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)}
        )
    )
    model.save_pretrained(tmp_path)
    reloaded = AutoModel.from_pretrained(tmp_path)
    assert reloaded.config.num_labels == 5
    assert torch.equal(reloaded.net[-1].weight, model.net[-1].weight)


def _shift_consistency_by_hand(generator, teachers, anchor, state, weight):
    """The relative squared distance to the student generated without the last non-anchor teacher."""
    cut = max(i for i in range(len(teachers)) if i != anchor)
    keep = [i for i in range(len(teachers)) if i != cut]
    shifted = generator(teachers.subset(keep), anchor=keep.index(anchor)).student_state
    terms = [
        (state[n] - shifted[n]).pow(2).sum() / state[n].detach().pow(2).sum()
        for n in state
        if state[n].is_floating_point()
    ]
    return weight * sum(terms) / len(terms)


def test_auxiliary_losses_are_off_by_default_and_differentiable_when_on():
    models = [make_model("mlp", seed) for seed in range(4)]
    teachers = wf.TeacherSet.from_models(models)
    generator = wf.WeightFormerModel.for_teachers(teachers, **SMALL)
    output = generator(teachers, anchor=1)
    assert generator.auxiliary_loss(teachers, 1, output) is None
    generator = wf.WeightFormerModel.for_teachers(teachers, **SMALL, shift_consistency_weight=0.5)
    # untrained, both students are the anchor: the loss is exactly zero
    output = generator(teachers, anchor=1)
    assert generator.auxiliary_loss(teachers, 1, output).item() == 0.0
    perturb(generator)
    params = [p for p in generator.parameters()]
    for anchor in (1, 3):  # cut teacher 3, then (the anchor being last) teacher 2
        output = generator(teachers, anchor=anchor)
        loss = generator.auxiliary_loss(teachers, anchor, output)
        expected = _shift_consistency_by_hand(generator, teachers, anchor, output.student_state, 0.5)
        assert loss.item() > 0
        torch.testing.assert_close(loss, expected, rtol=1e-6, atol=0)
        got = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        want = torch.autograd.grad(expected, params, allow_unused=True)
        assert any(g is not None and g.abs().sum() > 0 for g in got)
        for name, g, w in zip([n for n, _ in generator.named_parameters()], got, want):
            assert (g is None) == (w is None), name
            if g is not None:
                torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-8, msg=name)
    pair = teachers.subset([0, 1])  # nothing to cut without leaving the anchor alone
    assert generator.auxiliary_loss(pair, 0, generator(pair, anchor=0)) is None


def test_batch_norm_statistics_receive_gradients():
    models = [make_model("hf_resnet", seed) for seed in range(2)]
    teachers = wf.TeacherSet.from_models(models)
    generator = wf.WeightFormerModel.for_teachers(teachers, **SMALL)
    perturb(generator)
    state = generator(teachers, anchor=0).student_state
    for tensor in state.values():
        if tensor.requires_grad:
            tensor.retain_grad()
    logits = wf.run_student(teachers, state, make_inputs("hf_resnet"))
    logits.sum().backward()
    name = "resnet.embedder.embedder.normalization.running_var"
    assert state[name].grad is not None and state[name].grad.abs().sum() > 0
    # the plain-ops BatchNorm computes what the module computes
    student = generator.generate_student(teachers)
    torch.testing.assert_close(logits.detach(), student(make_inputs("hf_resnet")).logits, rtol=1e-4, atol=1e-5)


def test_teacher_set_to_device_keeps_students_identical():
    models = [make_model("mlp", seed) for seed in range(3)]
    teachers = wf.TeacherSet.from_models(models)
    generator = wf.WeightFormerModel.for_teachers(teachers, **SMALL)
    perturb(generator)
    moved = teachers.to("cpu")
    assert moved.state_dicts[0] is not teachers.state_dicts[0]
    a, b = generator(teachers).student_state, generator(moved).student_state
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_the_anchor_is_a_teacher_index():
    import numpy as np

    from weightformer_hf import TeacherSet, WeightFormerModel
    from weightformer_hf.reference_models import MLPClassifier, MLPClassifierConfig

    torch.manual_seed(0)
    teachers = TeacherSet.from_models([MLPClassifier(MLPClassifierConfig(hidden_sizes=(8,))) for _ in range(2)])
    generator = WeightFormerModel.for_teachers(teachers, hidden_size=16, num_attention_heads=2, intermediate_size=32)
    student = generator.generate_student(teachers, anchor=np.int64(1))  # what an argmax returns
    assert all(torch.equal(v, teachers.state_dicts[1][k]) for k, v in student.state_dict().items())
    with pytest.raises(TypeError, match="anchor must be a teacher index"):
        generator.generate_student(teachers, anchor=1.5)
    with pytest.raises(IndexError, match="anchor 2 is out of range for 2 teachers"):
        generator.generate_student(teachers, anchor=2)
