"""`examples/experiments/generator_design.py --rescale`: the augmentation must keep every teacher's function."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from families import make_model
from weightformer_hf.modeling import run_student

import weightformer_hf as wf
from weightformer_hf import training

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "examples"))
sys.path.insert(0, str(REPO / "examples" / "experiments"))


def test_rescaling_keeps_each_teachers_logits_and_changes_its_weights(monkeypatch):
    import generator_design

    models = [make_model("mlp", seed) for seed in range(3)]
    teachers = wf.TeacherSet.from_models(models)
    seen = {}

    def record(generator, pool, episode, *rest, **kwargs):
        seen.update(pool=pool, episode=episode)
        return torch.tensor(0.0)

    monkeypatch.setattr(training, "episode_loss", record)
    generator_design._augment_episodes_by_rescaling(teachers, 0.5, seed=0)
    training.episode_loss(None, teachers, ([2, 0], 1), None)
    assert seen["episode"] == ([0, 1], 1)  # positions in the rescaled subset, the anchor kept
    x = torch.randn(5, 40, generator=torch.Generator().manual_seed(0))
    for position, member in enumerate([2, 0]):
        state, original = seen["pool"].state_dicts[position], models[member].state_dict()
        assert torch.allclose(run_student(seen["pool"], state, x), models[member](x).logits, atol=1e-5)
        assert not torch.allclose(state["net.0.weight"], original["net.0.weight"])
        assert torch.equal(state["net.4.bias"], original["net.4.bias"])  # the classifier's outputs are not units


def test_rescaling_refuses_architectures_it_is_not_exact_for():
    import generator_design

    teachers = wf.TeacherSet.from_models([make_model("cnn1d", 0)])
    with pytest.raises(SystemExit, match="exact only for the ReLU MLPs"):
        generator_design._augment_episodes_by_rescaling(teachers, 0.5, seed=0)


def test_descriptors_follow_the_alignment_and_mark_the_anchor():
    import generator_design

    models = [make_model("mlp", seed) for seed in range(3)]
    teachers = wf.TeacherSet.from_models(models)
    probe = torch.randn(64, 40, generator=torch.Generator().manual_seed(1))
    generator = generator_design._descriptor_generator(probe).for_teachers(teachers)
    perms = generator._alignments(teachers, 0)
    spec = teachers.family.permutation_spec(teachers.template)
    layer = teachers.layers[0][0]  # net.0: the first hidden units
    inputs = generator._one_layer_inputs(teachers, 0, 0, layer, perms, spec, keep=True)
    units = layer.channels
    assert inputs.descriptors.shape == (3, units, 5)
    assert torch.allclose(inputs.descriptors[0, :, 3], torch.ones(units))  # the anchor's correlation with itself
    # teacher 1's aligned unit r is its unit perm[r]: its mean pre-activation, read by hand
    group = spec["net.0.weight"][0][0]
    by_hand = models[1].net[0](probe).detach()[:, perms[1][group]]
    scale = torch.stack([models[k].net[0](probe).detach() for k in range(3)]).pow(2).mean().sqrt()
    assert torch.allclose(inputs.descriptors[1, :, 0], by_hand.mean(0) / scale, atol=1e-5)
    student = generator.generate_student(teachers)  # untrained: the descriptors change nothing yet
    assert all(torch.equal(v, models[0].state_dict()[k]) for k, v in student.state_dict().items())


def test_base_token_is_the_last_teacher_with_its_own_role(monkeypatch):
    import generator_design

    models = [make_model("mlp", seed) for seed in range(3)]
    teachers = wf.TeacherSet.from_models(models[:2])
    base = wf.TeacherSet.from_models(models[2:])
    seen = {}

    def record(generator, pool, episode, *rest, **kwargs):
        seen.update(pool=pool, episode=episode)
        return torch.tensor(0.0)

    monkeypatch.setattr(training, "episode_loss", record)
    set_of = generator_design._append_base_in_episodes(base, teachers)
    training.episode_loss(None, teachers, ([1], 0), None)
    assert seen["episode"] == ([0, 1], 0) and seen["pool"].state_dicts[1] is base.state_dicts[0]
    assert len(set_of([0, 1])) == 3 and len(teachers) == 2  # the pool itself is left as it was
    generator = generator_design._base_token_generator().for_teachers(teachers)
    roles = generator.role_embed(torch.tensor([1, 0, 0]))
    assert torch.equal(roles[1], generator.role_embed.roles.weight[0])
    assert torch.allclose(roles[2], generator.role_embed.base)
