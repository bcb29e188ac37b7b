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



def test_coupled_layers_see_the_previous_layers_states():
    import generator_design

    teachers = wf.TeacherSet.from_models([make_model("mlp", seed) for seed in range(3)])
    anchor_state = teachers.model(0).state_dict()
    changed = {}
    for name, cls in (("coupled", generator_design._coupled_generator()), ("base", wf.WeightFormerModel)):
        torch.manual_seed(0)
        generator = cls.for_teachers(teachers, hidden_size=16, intermediate_size=32, use_cross_token=False)
        untrained = generator.generate_student(teachers).state_dict()
        assert all(torch.equal(v, anchor_state[k]) for k, v in untrained.items())  # still the anchor, bit for bit
        for decoder in generator.decoders:
            torch.nn.init.normal_(decoder.weight, std=0.1)
        before = generator(teachers).student_state["net.2.weight"]
        with torch.no_grad():
            generator.embedders[0].weight.mul_(2.0)  # the first layer's unit states change
        after = generator(teachers).student_state["net.2.weight"]
        changed[name] = not torch.allclose(before, after)
    assert changed == {"coupled": True, "base": False}  # only the coupled generator passes them on
