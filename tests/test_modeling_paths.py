"""Paths of the generator that the contract tests in test_core.py do not reach: `run_student`'s isolation,
forward's signature, removed options, multi-chunk tokens, gradient checkpointing, the ablation switches and
the cached token path. Each test compares against values computed by hand, not only shapes."""

from __future__ import annotations

import json

import pytest
import torch
from families import make_inputs, make_model

import weightformer_hf as wf

SMALL = {
    "hidden_size": 32,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "num_hidden_layers": 1,
    "align_max_iter": 2,
}


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.is_floating_point() else t


def perturb(model: torch.nn.Module, seed: int = 0, std: float = 0.05) -> None:
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * std)


# ------------------------------------------------------------------------------------------- run_student
@pytest.mark.parametrize("family", ["hf_resnet", "timm_resnet", "mlp"])
@pytest.mark.parametrize("template_mode", [True, False])
def test_run_student_leaves_the_template_untouched(family, template_mode):
    teachers = wf.TeacherSet.from_models([make_model(family, seed) for seed in range(2)])
    template = teachers.template.train(template_mode)
    before = {name: (m.training, type(m), dict(vars(m)).get("forward")) for name, m in template.named_modules()}
    devices = {t.device for t in template.state_dict().values()}
    snapshot = {k: v.clone() for k, v in template.state_dict().items()}
    generator = wf.WeightFormerModel.for_teachers(teachers, **SMALL)
    perturb(generator)
    state = generator(teachers, anchor=0).student_state
    inputs = make_inputs(family)
    logits = wf.run_student(teachers, state, inputs)
    logits.sum().backward()
    after = {name: (m.training, type(m), dict(vars(m)).get("forward")) for name, m in template.named_modules()}
    assert after == before
    assert all(f is None for _, _, f in after.values()), "a module's forward was patched"
    assert {t.device for t in template.state_dict().values()} == devices
    for name, tensor in template.state_dict().items():
        assert torch.equal(bits(tensor), bits(snapshot[name])), name
    # the student still runs in eval mode, whatever the template's mode
    student = generator.generate_student(teachers)
    torch.testing.assert_close(logits.detach(), teachers.family.logits(student, inputs), rtol=1e-4, atol=1e-5)


def test_run_student_on_another_device_moves_a_private_copy_not_the_template():
    teachers = wf.TeacherSet.from_models([make_model("mlp", 0)])
    template = teachers.template
    state = {k: v.to("meta") for k, v in teachers.state_dicts[0].items()}
    logits = wf.run_student(teachers, state, make_inputs("mlp").to("meta"))
    assert logits.device.type == "meta" and logits.shape == (3, 10)
    assert {t.device.type for t in template.state_dict().values()} == {"cpu"}
    # and back on the CPU, the private CPU copy gives the teacher's logits
    x = make_inputs("mlp")
    torch.testing.assert_close(wf.run_student(teachers, teachers.state_dicts[0], x), teachers.model(0)(x).logits)


# --------------------------------------------------------------------------------------------- forward
def test_forward_refuses_unknown_keywords():
    models = [make_model("mlp", seed) for seed in range(2)]
    generator = wf.WeightFormerModel.for_teachers(models, **SMALL)
    teachers = wf.TeacherSet.from_models(models)
    with pytest.raises(TypeError, match="return_dict"):
        generator(teachers, anchor=0, return_dict=True)
    with pytest.raises(TypeError, match="anchr"):
        generator(teachers, anchr=1)
    assert generator(teachers, anchor=1).student_state is not None


# ------------------------------------------------------------------------------------- removed options
@pytest.mark.parametrize("old", [{"copy_path": False, "mask_sparsity_weight": 0.0}, {"copy_path": False}])
def test_configs_saved_with_the_removed_options_switched_off_still_load(tmp_path, old):
    teachers = wf.TeacherSet.from_models([make_model("mlp", seed) for seed in range(2)])
    generator = wf.WeightFormerModel.for_teachers(teachers, **SMALL)
    perturb(generator)
    generator.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert "copy_path" not in config and "mask_sparsity_weight" not in config
    (tmp_path / "config.json").write_text(json.dumps({**config, **old}))
    reloaded = wf.WeightFormerModel.from_pretrained(tmp_path)
    assert not hasattr(reloaded.config, "copy_path") and not hasattr(reloaded.config, "mask_sparsity_weight")
    expected = generator(teachers, anchor=1).student_state
    for name, tensor in reloaded(teachers, anchor=1).student_state.items():
        assert torch.equal(tensor, expected[name]), name


@pytest.mark.parametrize("old", [{"copy_path": True}, {"mask_sparsity_weight": 0.1}])
def test_configs_that_switch_a_removed_option_on_are_refused(tmp_path, old):
    generator = wf.WeightFormerModel.for_teachers([make_model("mlp", 0)], **SMALL)
    generator.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, **old}))
    name = next(iter(old))
    with pytest.raises(ValueError, match=f"{name}.*removed"):
        wf.WeightFormerModel.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match=f"{name}.*removed"):
        wf.WeightFormerConfig(**old)
