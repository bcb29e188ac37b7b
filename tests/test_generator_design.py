"""`examples/experiments/`: `generator_design.py`'s augmentation keeps every teacher's function and its generator
variants start at the anchor and change what they claim to; `alignment_quality.py` matches units exactly."""

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


def _unit_state_generator(rank, interpolate, messages, teachers):
    import generator_design

    torch.manual_seed(0)
    cls = generator_design._unit_state_generator(rank, interpolate, messages)
    return cls.for_teachers(teachers, hidden_size=16, intermediate_size=32)


def test_unit_state_generator_starts_at_the_anchor_and_interpolates_towards_the_aligned_others():
    from weightformer_hf.alignment import permute_tensor

    teachers = wf.TeacherSet.from_models([make_model("mlp", seed) for seed in range(2)])
    generator = _unit_state_generator(3, True, True, teachers)
    anchor_state = teachers.model(0).state_dict()
    untrained = generator.generate_student(teachers).state_dict()
    assert all(torch.equal(v, anchor_state[k]) for k, v in untrained.items())  # the anchor, bit for bit
    with torch.no_grad():  # every segment: coefficient -1 on (others' aligned mean - anchor), 0 on the anchor
        for index, coef in enumerate(generator.row_coef):
            offset = 3 if generator._links[index] else 0
            coef.bias[offset + 1 :: 2] = -1.0
    student = generator.generate_student(teachers).state_dict()
    spec = teachers.family.permutation_spec(teachers.template)
    perms = generator._alignments(teachers, 0)
    other = teachers.model(1).state_dict()
    for name, value in student.items():  # K = 2: the other teacher, aligned to the anchor
        assert torch.allclose(value, permute_tensor(name, other[name], spec, perms[1]), atol=1e-6)


def test_unit_state_changes_have_the_rank_asked_for_and_follow_the_input_units_states():
    teachers = wf.TeacherSet.from_models([make_model("mlp", seed) for seed in range(3)])
    generator = _unit_state_generator(2, False, False, teachers)
    assert [[link[4] for link in links] for links in generator._links] == [[], ["P_net.0"], ["P_net.2"]]
    with torch.no_grad():
        for coef in generator.row_coef:
            if isinstance(coef, torch.nn.Linear):  # layers with no term have none
                torch.nn.init.normal_(coef.weight, std=0.5)
    anchor_state = teachers.model(0).state_dict()
    state = generator(teachers).student_state
    assert torch.equal(state["net.0.weight"], anchor_state["net.0.weight"])  # reads inputs, not units
    change = state["net.2.weight"] - anchor_state["net.2.weight"]
    assert torch.linalg.matrix_rank(change, rtol=1e-4).item() == 2
    with torch.no_grad():
        generator.embedders[0].weight.mul_(2.0)  # the first layer's unit states change ...
    after = generator(teachers).student_state
    assert not torch.allclose(after["net.2.weight"], state["net.2.weight"])  # ... and with them its readers


def test_anchor_only_reads_the_anchor_and_distils_towards_the_whole_set(monkeypatch):
    import generator_design

    teachers = wf.TeacherSet.from_models([make_model("mlp", seed) for seed in range(3)])
    generator = wf.WeightFormerModel.for_teachers(teachers, hidden_size=16, intermediate_size=32)
    read = []
    forward = generator.forward

    def recording(ts, anchor=0):
        read.append([info.identity for info in ts.infos])
        return forward(ts, anchor)

    monkeypatch.setattr(generator, "forward", recording)
    monkeypatch.setattr(training, "episode_loss", training.episode_loss)  # restored after the test
    generator_design._generator_reads_anchor_only()
    x, labels = torch.randn(6, 40), torch.randint(0, 10, (6,))
    logits = torch.stack([teachers.model(i)(x).logits for i in range(3)]).detach()
    loss = training.episode_loss(generator, teachers, ([2, 0, 1], 1), x, labels, logits, 0.3, 4.0)
    assert read == [[teachers.infos[0].identity]]  # member 0 is the anchor (position 1): it alone is read
    expected = training.kd_loss(teachers.model(0)(x).logits, logits, labels, 0.3, 4.0)  # untrained: the anchor
    assert torch.allclose(loss, expected)


def test_teacher_mix_with_an_open_gate_and_one_favoured_teacher_returns_that_teacher():
    from weightformer_hf.alignment import permute_tensor

    teachers = wf.TeacherSet.from_models([make_model("mlp", seed) for seed in range(3)])
    import generator_design

    torch.manual_seed(0)
    generator = generator_design._unit_state_generator(0, False, False, mix=True).for_teachers(
        teachers, hidden_size=16, intermediate_size=32
    )
    anchor_state = teachers.model(0).state_dict()
    assert all(torch.equal(v, anchor_state[k]) for k, v in generator.generate_student(teachers).state_dict().items())
    with torch.no_grad():
        for coef in generator.row_coef:
            coef.bias.fill_(1.0)  # the gate open on every tensor
    generator.mix_key.register_forward_hook(  # teacher 2's tokens score far above the others'
        lambda module, args, out: out * 0 + torch.tensor([0.0, 0.0, 1e4])[:, None, None] * out.new_ones(out.shape)
    )
    generator.mix_query.register_forward_hook(lambda module, args, out: out * 0 + 1.0)
    student = generator.generate_student(teachers).state_dict()
    spec = teachers.family.permutation_spec(teachers.template)
    perms = generator._alignments(teachers, 0)
    other = teachers.model(2).state_dict()
    for name, value in student.items():
        assert torch.allclose(value, permute_tensor(name, other[name], spec, perms[2]), atol=1e-5)


def test_best_val_training_anchor_is_the_member_with_the_best_accuracy(monkeypatch):
    import random

    import generator_design

    monkeypatch.setattr(training, "sample_episode", training.sample_episode)  # restored after the test
    accuracy = [0.5, 0.9, 0.7, 0.8, 0.6]
    generator_design._episodes_anchor_on_best_val(accuracy)
    for step in range(20):
        members, anchor = training.sample_episode(random.Random(step), 5, 2, 4)
        assert accuracy[members[anchor]] == max(accuracy[m] for m in members)


def test_variants_with_nothing_switched_on_compute_what_the_library_generator_does():
    teachers = wf.TeacherSet.from_models([make_model("mlp", seed) for seed in range(3)])
    torch.manual_seed(0)
    base = wf.WeightFormerModel.for_teachers(teachers, hidden_size=16, intermediate_size=32)
    for decoder in base.decoders:
        torch.nn.init.normal_(decoder.weight, std=0.1)
    variant = _unit_state_generator(0, False, False, teachers)
    assert variant.load_state_dict(base.state_dict()).missing_keys == []  # no term: no parameter of its own
    expected, got = base(teachers, anchor=1).student_state, variant(teachers, anchor=1).student_state
    assert all(torch.allclose(expected[k], got[k], atol=1e-6) for k in expected)
    assert any(not torch.equal(expected[k], teachers.state_dicts[1][k]) for k in expected)  # it did change


def test_activation_matching_recovers_a_planted_permutation():
    import alignment_quality

    from weightformer_hf.alignment import permute_tensor

    teachers = wf.TeacherSet.from_models([make_model("mlp", 0)])
    spec = teachers.family.permutation_spec(teachers.template)
    anchor = teachers.state_dicts[0]
    g = torch.Generator().manual_seed(1)
    planted = {group: torch.randperm(16, generator=g) for group in ("P_net.0", "P_net.2")}
    other = {n: permute_tensor(n, v, spec, planted) for n, v in anchor.items()}  # the same net, units shuffled
    x = torch.randn(500, 40, generator=g)
    perms = alignment_quality.activation_matching(spec, anchor, other, x)
    restored = {n: permute_tensor(n, v, spec, perms) for n, v in other.items()}
    assert all(torch.equal(restored[n], anchor[n]) for n in anchor)


@pytest.mark.parametrize("mode", ["teacher", "mean"])
def test_canonical_order_puts_shuffled_copies_in_the_references_order_and_keeps_every_function(mode):
    import generator_design

    from weightformer_hf.alignment import permute_tensor

    models = [make_model("mlp", seed) for seed in range(2)]
    reference = models[0].state_dict()
    spec = wf.TeacherSet.from_models(models[:1]).family.permutation_spec(models[0])
    g = torch.Generator().manual_seed(1)
    planted = {group: torch.randperm(16, generator=g) for group in ("P_net.0", "P_net.2")}
    shuffled = {n: permute_tensor(n, v, spec, planted) for n, v in reference.items()}
    teachers = wf.TeacherSet.from_models(models)
    teachers.state_dicts.append(shuffled)
    teachers.infos.append(teachers.infos[0])
    x = torch.randn(7, 40, generator=g)
    before = [run_student(teachers, sd, x) for sd in teachers.state_dicts]
    # the mean of one reference teacher is that teacher: both modes give its exact order
    generator_design._canonicalise(teachers, [0], mode, rounds=2)
    assert all(torch.equal(teachers.state_dicts[2][n], reference[n]) for n in reference)
    assert not torch.equal(shuffled["net.0.weight"], reference["net.0.weight"])
    for sd, logits in zip(teachers.state_dicts, before):
        assert torch.allclose(run_student(teachers, sd, x), logits, atol=1e-5)


def test_weight_average_follows_each_optimizer_step_and_is_swapped_in_only_inside_its_context(monkeypatch):
    import generator_design

    monkeypatch.setattr(training, "optimizer_and_scheduler", training.optimizer_and_scheduler)  # restored after
    average = generator_design._average_generator_weights(0.5)
    module = torch.nn.Linear(2, 1)
    with torch.no_grad():
        module.weight.fill_(1.0)
        module.bias.fill_(0.0)
    optimizer, _ = training.optimizer_and_scheduler(module, 0.1, 0.0, "constant", 0, 10)
    optimizer.param_groups[0]["betas"] = (0.0, 0.0)  # Adam without momentum: each step moves by lr * sign(grad)
    for _ in range(2):
        module.weight.grad, module.bias.grad = torch.ones_like(module.weight), torch.ones_like(module.bias)
        optimizer.step()
    assert module.weight[0, 0].item() == pytest.approx(0.8, abs=1e-5)  # two steps of 0.1
    own = module.weight.detach().clone()
    with average.swapped_in(module):
        assert module.weight[0, 0].item() == pytest.approx(0.875, abs=1e-5)  # 0.5 * (0.5 * 1 + 0.5 * 0.9) + 0.5 * 0.8
    assert torch.equal(module.weight, own)
    with pytest.raises(RuntimeError, match="tracks another module"), average.swapped_in(torch.nn.Linear(2, 1)):
        pass


def test_matching_rounds_scores_recovery_of_the_planted_permutation():
    import matching_rounds

    model = make_model("timm_vgg", 0)
    rows = matching_rounds.recovery(model, [0.0, 100.0], settings=[(30, 1e-3)])
    exact, drowned = rows
    assert exact["sigma"] == 0.0 and exact["recovered"] == 1.0 and exact["rounds"] >= 1
    assert drowned["recovered"] < 0.5  # noise 100× the weights: the planted order is lost


def test_probe_bilinear_generator_starts_at_the_anchor_and_its_changes_follow_the_input_units_activations():
    import generator_design

    teachers = wf.TeacherSet.from_models([make_model("mlp", seed) for seed in range(3)])
    probes = torch.randn(7, 40)
    torch.manual_seed(0)
    cls = generator_design._probe_bilinear_generator(2, probes, 4.0)
    generator = cls.for_teachers(teachers, hidden_size=16, intermediate_size=32)
    anchor_state = teachers.model(1).state_dict()
    untrained = generator.generate_student(teachers, anchor=1).state_dict()
    assert all(torch.equal(v, anchor_state[k]) for k, v in untrained.items())  # the anchor, bit for bit
    assert sorted(generator.row_coef) == ["1", "2"]  # net.2 and net.4 read hidden units; net.0 reads inputs
    with torch.no_grad():
        for coef in generator.row_coef.values():
            torch.nn.init.normal_(coef.weight, std=0.5)
    state = generator(teachers, anchor=1).student_state
    assert torch.equal(state["net.0.weight"], anchor_state["net.0.weight"])
    change = state["net.2.weight"] - anchor_state["net.2.weight"]
    assert torch.linalg.matrix_rank(change, rtol=1e-4).item() == 2
    hidden = generator_design._mlp_activations(teachers.template, anchor_state, probes)["P_net.0"]
    with torch.no_grad():  # each row's change is a mix of the input units' projected activations U h_c
        columns = generator.col_proj["1"](hidden)
        fit = torch.linalg.lstsq(columns, change.T).solution
    assert torch.allclose(columns @ fit, change.T, atol=1e-5)
    assert not torch.allclose(torch.randn(16, 2) @ fit, change.T, atol=1e-2)  # the fit can fail
    expected = torch.relu(probes @ anchor_state["net.0.weight"].T + anchor_state["net.0.bias"]).T
    assert torch.allclose(hidden, expected)


def test_probe_bilinear_grad_step_moves_each_row_along_the_anchors_normalised_gradient():
    import generator_design

    teachers = wf.TeacherSet.from_models([make_model("mlp", seed) for seed in range(3)])
    probes, labels = torch.randn(9, 40), torch.randint(0, 10, (9,))
    torch.manual_seed(0)
    cls = generator_design._probe_bilinear_generator(2, probes, 4.0, True, labels, 0.3)
    generator = cls.for_teachers(teachers, hidden_size=16, intermediate_size=32)
    anchor_state = teachers.model(0).state_dict()
    assert all(torch.equal(v, anchor_state[k]) for k, v in generator.generate_student(teachers).state_dict().items())
    with torch.no_grad():
        for step in generator.step_size.values():
            step.bias.fill_(1.0)  # a unit step (in normalised units) on every row of every tensor
    state = generator(teachers).student_state
    params = {n: anchor_state[n].clone().requires_grad_() for n in teachers.shapes}
    targets = torch.stack([teachers.model(i)(probes).logits for i in range(3)]).detach()
    logits = torch.func.functional_call(teachers.model(0), params, (probes,)).logits
    grads = torch.autograd.grad(training.kd_loss(logits, targets, labels, 0.3, 4.0), list(params.values()))
    for (name, anchor_value), grad in zip(params.items(), grads):
        scale = torch.stack([teachers.state_dicts[i][name] for i in range(3)]).pow(2).mean().sqrt()
        expected = anchor_value.detach() - scale * grad / grad.pow(2).mean().sqrt()
        assert torch.allclose(state[name], expected, atol=1e-5), name


def test_probe_bilinear_ablation_parts_switch_the_bilinear_change_off():
    import generator_design

    teachers = wf.TeacherSet.from_models([make_model("mlp", seed) for seed in range(2)])
    probes = torch.randn(5, 40)
    changed = {}
    for parts in ("both", "messages"):
        torch.manual_seed(0)
        cls = generator_design._probe_bilinear_generator(2, probes, 4.0, parts=parts)
        generator = cls.for_teachers(teachers, hidden_size=16, intermediate_size=32)
        with torch.no_grad():
            for coef in generator.row_coef.values():
                torch.nn.init.normal_(coef.weight, std=0.5)
        anchor = teachers.model(0).state_dict()["net.2.weight"]
        changed[parts] = not torch.equal(generator(teachers).student_state["net.2.weight"], anchor)
    assert changed == {"both": True, "messages": False}  # the decoders are still zero: only the bilinear term acts


def test_probe_bilinear_refuses_teachers_that_are_not_the_relu_mlps_and_says_so():
    import generator_design

    teachers = wf.TeacherSet.from_models([make_model("cnn1d", seed) for seed in range(2)])
    cls = generator_design._probe_bilinear_generator(2, torch.randn(3, 40), 4.0)
    with pytest.raises(SystemExit, match="--probe_bilinear reads the ReLU MLPs"):
        cls.for_teachers(teachers, hidden_size=16, intermediate_size=32)


def test_kd_ceiling_refuses_one_step_with_more_samples_before_loading_anything(monkeypatch):
    import kd_ceiling

    monkeypatch.setattr(kd_ceiling, "load_run", lambda pool: pytest.fail("the pool was loaded"))
    with pytest.raises(SystemExit, match="--one_step reads the meta split"):
        kd_ceiling.main(["--one_step", "0.1", "--meta_samples", "1000"])


def test_closed_form_merge_of_permuted_copies_recovers_the_teacher():
    """`closed_form_merge.py`: K copies of one MLP with shuffled hidden units are matched back to the anchor's
    order, so the aligned mean is the anchor's own pre-activations and the ridge fits give back its weights."""
    import closed_form_merge as cfm

    torch.manual_seed(0)
    sizes = [12, 16, 8, 3]
    anchor = [
        (torch.randn(o, i, dtype=torch.float64), torch.randn(o, dtype=torch.float64)) for i, o in zip(sizes, sizes[1:])
    ]
    copies = [anchor]
    for seed in (1, 2):
        g = torch.Generator().manual_seed(seed)
        perms = [torch.randperm(n, generator=g) for n in sizes[1:-1]]
        layers, previous = [], None
        for i, (w, b) in enumerate(anchor):
            w = w if previous is None else w[:, previous]
            if i < len(perms):
                w, b = w[perms[i]], b[perms[i]]
                previous = perms[i]
            layers.append((w, b))
        copies.append(layers)
    probe = torch.randn(400, sizes[0], dtype=torch.float64)
    assert not torch.equal(copies[1][0][0], anchor[0][0])  # the copies really are shuffled
    for mode in ("aligned_mean", "aligned_mean_keep_l1", "refit_classifier"):
        merged = cfm.merge(copies, probe, mode, strength=0.0)
        for (w, b), (w0, b0) in zip(merged, anchor):
            assert torch.allclose(w, w0, atol=1e-8) and torch.allclose(b, b0, atol=1e-8), mode


@pytest.mark.parametrize("anchor_first", [False, True])
def test_fixed_set_episodes_draw_only_those_sets(monkeypatch, anchor_first):
    import random

    import generator_design

    monkeypatch.setattr(training, "sample_episode", training.sample_episode)  # restored after the test
    generator_design._episodes_from_fixed_sets([[10, 11, 12], [20, 21, 22]], anchor_first=anchor_first)
    rng, anchors = random.Random(0), set()
    for _ in range(50):
        members, anchor = training.sample_episode(rng, 6, 2, 6)
        assert sorted(members) in ([0, 1, 2], [3, 4, 5])  # positions in the pool of exactly those teachers
        anchors.add(members[anchor] % 3)
    assert anchors == ({0} if anchor_first else {0, 1, 2})  # the set's first member, or each in turn


def test_weight_space_target_adds_its_weight_for_an_untrained_generator_and_nothing_at_the_target(monkeypatch):
    import generator_design

    teachers = wf.TeacherSet.from_models([make_model("mlp", seed) for seed in range(3)])
    generator = wf.WeightFormerModel.for_teachers(teachers, hidden_size=16, intermediate_size=32)
    x, labels = torch.randn(6, 40), torch.randint(0, 10, (6,))
    logits = torch.stack([teachers.model(i)(x).logits for i in range(3)]).detach()
    functional = training.kd_loss(teachers.model(0)(x).logits, logits, labels, 0.3, 4.0)  # untrained: the anchor
    anchor = teachers.state_dicts[0]
    change = {n: torch.randn_like(t) for n, t in anchor.items()}
    monkeypatch.setattr(training, "episode_loss", training.episode_loss)  # restored after the test
    generator_design._weight_space_target({0: change}, weight=0.5)
    loss = training.episode_loss(generator, teachers, ([1, 0, 2], 1), x, labels, logits, 0.3, 4.0)
    assert torch.allclose(loss, functional + 0.5)  # every tensor misses its whole change: 1 each, weighed 0.5
    generator_design._weight_space_target({0: {n: torch.zeros_like(t) for n, t in anchor.items()}}, weight=0.5)
    loss = training.episode_loss(generator, teachers, ([1, 0, 2], 1), x, labels, logits, 0.3, 4.0)
    assert torch.allclose(loss, functional)  # the untrained student is the anchor: no change was the target


def test_permuted_episodes_keep_the_anchors_function_and_align_the_others_to_it_without_new_matching(monkeypatch):
    import generator_design

    from weightformer_hf import alignment
    from weightformer_hf.alignment import permute_tensor

    base = wf.TeacherSet.from_models([make_model("mlp", 0)])
    spec = base.family.permutation_spec(base.template)
    g = torch.Generator().manual_seed(1)
    planted = {group: torch.randperm(16, generator=g) for group in ("P_net.0", "P_net.2")}
    shuffled = make_model("mlp", 0)
    shuffled.load_state_dict({n: permute_tensor(n, v, spec, planted) for n, v in base.state_dicts[0].items()})
    teachers = wf.TeacherSet.from_models([make_model("mlp", 0), shuffled, make_model("mlp", 1)])
    generator = wf.WeightFormerModel.for_teachers(teachers, hidden_size=16, intermediate_size=32)
    x, labels = torch.randn(6, 40), torch.randint(0, 10, (6,))
    logits = torch.stack([teachers.model(i)(x).logits for i in range(3)]).detach()
    plain = training.episode_loss(generator, teachers, ([1, 0, 2], 1), x, labels, logits, 0.3, 4.0)
    seen = []
    monkeypatch.setattr(training, "episode_loss", lambda gen, pool, episode, *rest: seen.append(pool) or plain)
    generator_design._augment_episodes_by_permuting(teachers, seed=0)
    monkeypatch.setattr(alignment, "weight_matching", lambda *a, **k: pytest.fail("weight matching ran again"))
    training.episode_loss(generator, teachers, ([1, 0, 2], 1), x, labels, logits, 0.3, 4.0)
    subset = seen[0]
    anchor = subset.state_dicts[1]
    assert not torch.equal(anchor["net.0.weight"], teachers.state_dicts[0]["net.0.weight"])  # reordered
    assert torch.allclose(run_student(subset, anchor, x), teachers.model(0)(x).logits, atol=1e-5)  # same function
    (key, perms), *_ = [(k, v) for k, v in subset.alignment_cache.items() if k[1] == subset.infos[0].identity]
    assert key[0] == subset.infos[1].identity != teachers.infos[0].identity
    aligned = {n: permute_tensor(n, v, spec, perms) for n, v in subset.state_dicts[0].items()}
    assert all(torch.equal(aligned[n], anchor[n]) for n in anchor)  # the planted copy lands on the reordered anchor
    monkeypatch.undo()
    monkeypatch.setattr(training, "episode_loss", training.episode_loss)  # restored after the test
    generator_design._augment_episodes_by_permuting(teachers, seed=0)  # the wrapper, now around the real loss
    monkeypatch.setattr(alignment, "weight_matching", lambda *a, **k: pytest.fail("weight matching ran again"))
    augmented = training.episode_loss(generator, teachers, ([1, 0, 2], 1), x, labels, logits, 0.3, 4.0)
    assert torch.allclose(augmented, plain, atol=1e-6)  # an untrained generator returns the (reordered) anchor


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--fit_sets", "2", "--fixed_sets"], "pass one"),
        (["--kd_target_weight", "1"], "needs --fixed_sets"),
    ],
)
def test_episode_flags_that_do_not_combine_are_refused_before_loading_anything(monkeypatch, flags, message):
    import generator_design

    monkeypatch.setattr(generator_design.plans, "full_plans", lambda: pytest.fail("the pool was loaded"))
    with pytest.raises(SystemExit, match=message):
        generator_design.main([*flags, "--tag", "x", "--no_record"])
