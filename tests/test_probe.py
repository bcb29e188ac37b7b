"""The probe batch (`probe_size`): each teacher's tokens carry its distillation gradient towards the set's
ensemble on inputs the generator stores. Gradients are checked against autograd on the teachers' own modules,
tokens against a hand-built layout, and the generator's contract (anchor at init, order-free, save/load)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from families import SMALL, bits, make_inputs, make_model, perturb

import weightformer_hf as wf

TEMPERATURE = 4.0


def _probe_generator(teachers, probe, **options):
    return wf.WeightFormerModel.for_teachers(teachers, probe_inputs=probe, **SMALL, **options)


def _gradients_by_hand(models, probe):
    """T²·KL(mean_j softmax(f_j/T) ‖ softmax(f_k/T)) per teacher, differentiated by autograd on the module."""
    with torch.no_grad():
        targets = torch.stack([F.softmax(m(probe).logits / TEMPERATURE, -1) for m in models]).mean(0)
    out = []
    for model in models:
        model.zero_grad()
        log_probs = F.log_softmax(model(probe).logits / TEMPERATURE, -1)
        loss = TEMPERATURE**2 * (targets * (targets.log() - log_probs)).sum(-1).mean()
        loss.backward()
        out.append({n: p.grad.clone() for n, p in model.named_parameters()})
    return out


@pytest.mark.parametrize("family", ["mlp", "cnn1d"])
def test_probe_gradients_equal_autograd_on_each_teacher(family):
    models = [make_model(family, seed) for seed in range(3)]
    probe = make_inputs(family, 16)
    teachers = wf.TeacherSet.from_models(models)
    generator = _probe_generator(teachers, probe, align_teachers=False)
    got = generator._probe_gradients(teachers)
    expected = _gradients_by_hand(models, probe)
    for k in range(3):
        for name, grad in expected[k].items():
            torch.testing.assert_close(got[k][name], grad, rtol=1e-4, atol=1e-7, msg=f"teacher {k} {name}")
            assert grad.abs().sum() > 0, name


def test_probe_tokens_follow_the_weight_tokens_layout():
    """Token = [weights | gradients], each tensor's gradient divided by its RMS over the set (no alignment)."""
    models = [make_model("mlp", seed) for seed in range(3)]
    probe = make_inputs("mlp", 16)
    teachers = wf.TeacherSet.from_models(models)
    generator = _probe_generator(teachers, probe, align_teachers=False)
    inputs = generator._layer_inputs(teachers, anchor=0)
    grads = _gradients_by_hand(models, probe)
    layers, _ = teachers.layers
    for layer, li in zip(layers, inputs):
        assert li.content.shape[-1] == 2 * generator.decoders[layers.index(layer)].out_features
        columns = []
        for t in layer.tensors:
            stack = torch.stack([g[t.name] for g in grads]).movedim(t.channel_axis + 1, 1)
            stack = stack.reshape(3, layer.channels, -1)
            columns.append(stack / stack.pow(2).mean().sqrt())
        expected = torch.cat(columns, -1)
        half = li.content.shape[-1] // 2
        got = li.content[..., half:].reshape(3, layer.channels, -1)[..., : expected.shape[-1]]
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6, msg=layer.name)


def test_one_teacher_has_zero_probe_gradients():
    models = [make_model("mlp", 0)]
    teachers = wf.TeacherSet.from_models(models)
    generator = _probe_generator(teachers, make_inputs("mlp", 8))
    for li in generator._layer_inputs(teachers, anchor=0):
        half = li.content.shape[-1] // 2
        assert torch.equal(li.content[..., half:], torch.zeros_like(li.content[..., half:]))
        assert li.content[..., :half].abs().sum() > 0


@pytest.mark.parametrize("family", ["mlp", "timm_resnet"])
def test_probe_generator_keeps_the_contract(family, tmp_path):
    models = [make_model(family, seed) for seed in range(4)]
    teachers = wf.TeacherSet.from_models(models)
    generator = _probe_generator(teachers, make_inputs(family, 8))
    for name, tensor in generator.generate_student(teachers, anchor=2).state_dict().items():
        assert torch.equal(bits(tensor), bits(models[2].state_dict()[name])), name
    perturb(generator, seed=3)
    a = generator(teachers, anchor=2).student_state
    b = generator(teachers.subset([3, 0, 2, 1]), anchor=2).student_state
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=name)
    # the gradient half of the tokens is read: zeroing its embedder columns changes the student
    with torch.no_grad():
        for embedder in generator.embedders:
            embedder.weight[:, embedder.in_features // 2 :] = 0
    c = generator(teachers, anchor=2).student_state
    assert any(not torch.allclose(a[n], c[n]) for n in a if a[n].is_floating_point())
    perturb(generator, seed=3)
    generator.save_pretrained(tmp_path)
    reloaded = wf.WeightFormerModel.from_pretrained(tmp_path)
    assert reloaded.config.probe_size == 8 and torch.equal(reloaded.probe_inputs, generator.probe_inputs)
    expected = generator.generate_student(teachers, anchor=1).state_dict()
    for name, tensor in reloaded.generate_student(teachers, anchor=1).state_dict().items():
        assert torch.equal(tensor, expected[name]), name


def test_another_probe_batch_gives_another_student():
    models = [make_model("mlp", seed) for seed in range(3)]
    teachers = wf.TeacherSet.from_models(models)
    generator = _probe_generator(teachers, make_inputs("mlp", 8))
    perturb(generator)
    a = generator(teachers, anchor=0).student_state
    with torch.no_grad():
        generator.probe_inputs.mul_(-1.0)  # in place: the token cache must see the new probe
    b = generator(teachers, anchor=0).student_state
    assert any(not torch.allclose(a[n], b[n]) for n in a if a[n].is_floating_point())


def test_probe_size_without_a_shape_is_refused():
    with pytest.raises(ValueError, match="probe_input_shape"):
        wf.WeightFormerConfig(probe_size=4)
