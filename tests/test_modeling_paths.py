"""Paths of the generator that the contract tests in test_core.py do not reach: `run_student`'s isolation,
forward's signature, removed options, multi-chunk tokens, gradient checkpointing, the ablation switches and
the cached token path. Each test compares against values computed by hand, not only shapes."""

from __future__ import annotations

import json

import pytest
import torch
from families import SMALL, bits, make_inputs, make_model, perturb
from transformers import AutoConfig
from weightformer_hf.modeling.modeling_weightformer import chunk_layout, describe_layers

import weightformer_hf as wf


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


def test_cross_attention_option_is_checked_and_saved(tmp_path):
    with pytest.raises(ValueError, match="cross_attention must be 'all' or 'aligned', not 'local'"):
        wf.WeightFormerConfig(cross_attention="local")
    assert wf.WeightFormerConfig().cross_attention == "aligned"  # new generators: the presets' choice
    generator = wf.WeightFormerModel.for_teachers([make_model("mlp", 0)], **SMALL)
    assert generator.config.cross_attention == "aligned"
    generator.save_pretrained(tmp_path / "new")
    assert wf.WeightFormerModel.from_pretrained(tmp_path / "new").config.cross_attention == "aligned"
    generator = wf.WeightFormerModel.for_teachers([make_model("mlp", 0)], **SMALL, cross_attention="all")
    generator.save_pretrained(tmp_path / "all")
    assert wf.WeightFormerModel.from_pretrained(tmp_path / "all").config.cross_attention == "all"
    config = json.loads((tmp_path / "new" / "config.json").read_text())
    del config["cross_attention"]  # a generator saved before the option existed attends to all tokens
    (tmp_path / "new" / "config.json").write_text(json.dumps(config))
    assert wf.WeightFormerModel.from_pretrained(tmp_path / "new").config.cross_attention == "all"
    assert AutoConfig.from_pretrained(tmp_path / "new").cross_attention == "all"
    assert wf.WeightFormerConfig.from_json_file(tmp_path / "new" / "config.json").cross_attention == "all"
    (tmp_path / "aligned.json").write_text(json.dumps({**config, "cross_attention": "aligned"}))
    assert wf.WeightFormerConfig.from_json_file(tmp_path / "aligned.json").cross_attention == "aligned"
    assert wf.WeightFormerConfig.from_pretrained(tmp_path / "new", cross_attention="aligned").cross_attention == (
        "aligned"
    )  # an explicit override still wins


# ---------------------------------------------------------------------------------- multi-chunk tokens
def _reference_student(generator, teachers, anchor):
    """The generator's maths written out with explicit loops over channels and chunks (no alignment:
    use `align_teachers=False`), as an independent statement of padding, chunk order and attention sets."""
    config, (layers, _) = generator.config, teachers.layers
    n_teachers = len(teachers)
    cross, student = generator.cross_init, {}
    for index, layer in enumerate(layers):
        columns, scales = [], []  # per teacher: (C, W) normalised tokens
        for t in layer.tensors:
            stack = torch.stack([sd[t.name].float() for sd in teachers.state_dicts])
            stack = stack.movedim(t.channel_axis + 1, 1).reshape(n_teachers, layer.channels, -1)
            scale = torch.ones(()) if t.positive else stack.pow(2).mean().sqrt().clamp_min(1e-6)
            columns.append((stack.clamp_min(1e-12).log() if t.positive else stack) / scale)
            scales += [scale] * stack.shape[-1]
        content = torch.cat(columns, dim=-1)
        width = content.shape[-1]
        n_chunks = -(-width // config.chunk_size)
        chunk = -(-width // n_chunks)
        decrements = torch.zeros(layer.channels, width)
        cross_outs = []
        for c in range(n_chunks):

            def token(k, i, c=c, index=index, content=content, chunk=chunk):
                piece = content[k, i, c * chunk : (c + 1) * chunk]
                piece = torch.cat([piece, piece.new_zeros(chunk - piece.numel())])  # the last chunk is padded
                return (
                    generator.embedders[index](piece)
                    + generator.chunk_embed.weight[generator.chunk_offsets[index] + c]
                    + generator.layer_embed.weight[index]
                    + generator.role_embed.weight[int(k == anchor)]
                )

            queries = []
            for i in range(layer.channels):
                q = token(anchor, i)
                others = [token(k, i) for k in range(n_teachers) if k != anchor]
                if config.pool_aligned and others:
                    q = q + generator.pool_proj(torch.stack(others).mean(0))
                queries.append(q)
            memory = torch.stack([token(k, i) for k in range(n_teachers) for i in range(layer.channels)])
            queries = torch.stack(([cross] if config.use_cross_token else []) + queries)
            for block in generator.blocks:
                if config.cross_attention == "all":
                    queries = block(queries[None], memory[None])[0]
                else:  # each channel's own K tokens, through the full attention module
                    own = [torch.stack([token(k, i) for k in range(n_teachers)]) for i in range(layer.channels)]
                    queries = _reference_aligned_block(block, queries, memory, own)
            queries = generator.final_norm(queries)
            if config.use_cross_token:
                cross_outs.append(queries[0])
                queries = queries[1:]
            out = generator.decoders[index](queries)  # (C, chunk)
            for j in range(chunk):
                if c * chunk + j < width:
                    decrements[:, c * chunk + j] = out[:, j]
        if config.use_cross_token:
            cross = torch.stack(cross_outs).mean(0)
        decrements = decrements * torch.stack(scales)
        start = 0
        for t in layer.tensors:
            value = teachers.state_dicts[anchor][t.name].float().movedim(t.channel_axis, 0)
            w = value[0].numel()
            dec = decrements[:, start : start + w].reshape(value.shape)
            start += w
            new = value * torch.exp(-dec) if t.positive else value - dec
            student[t.name] = new.movedim(0, t.channel_axis)
    return student


def _reference_aligned_block(block, queries, memory, own):
    """A block with `cross_attention="aligned"`, written with the `"all"` attention module: channel i's query
    over its own K tokens `own[i]`, the `[cross]` query (if any) over every token of `memory`."""
    x = block.self_norm(queries)
    queries = queries + block.self_attn(x[None], x[None])[0]
    q, lead = block.cross_norm(queries), len(queries) - len(own)
    rows = [block.cross_attn(q[None, :lead], block.memory_norm(memory)[None])[0]] if lead else []
    for i, keys in enumerate(own):
        rows.append(block.cross_attn(q[None, lead + i : lead + i + 1], block.memory_norm(keys)[None])[0])
    queries = queries + torch.cat(rows)
    return queries + block.mlp(block.mlp_norm(queries))


@pytest.mark.parametrize("family,chunk_size", [("mlp", 16), ("cnn1d", 6)])
def test_multi_chunk_tokens_match_a_loop_over_chunks(family, chunk_size):
    models = [make_model(family, seed) for seed in range(3)]
    teachers = wf.TeacherSet.from_models(models)
    # exact anchor at initialisation, alignment on
    generator = wf.WeightFormerModel.for_teachers(teachers, **SMALL, chunk_size=chunk_size)
    widths = [x["width"] for x in describe_layers(teachers)]
    layouts = [chunk_layout(w, chunk_size) for w in widths]
    assert sum(n >= 2 for n, _ in layouts) >= 2, layouts  # several multi-chunk layers ...
    assert any(n * c > w for (n, c), w in zip(layouts, widths)), layouts  # ... and padding
    student = generator.generate_student(teachers, anchor=1).state_dict()
    for name, tensor in models[1].state_dict().items():
        assert torch.equal(bits(student[name]), bits(tensor)), name
    # a perturbed generator computes what the explicit loop computes
    generator = wf.WeightFormerModel.for_teachers(teachers, **SMALL, chunk_size=chunk_size, align_teachers=False)
    perturb(generator)
    generator.eval()
    with torch.no_grad():
        state = generator(teachers, anchor=1).student_state
        expected = _reference_student(generator, teachers, anchor=1)
    for name, tensor in expected.items():
        torch.testing.assert_close(state[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
        assert not torch.equal(state[name], models[1].state_dict()[name]), name


@pytest.mark.parametrize("lead", [1, 0])
def test_aligned_attention_in_channel_blocks_computes_what_it_computes_whole(monkeypatch, lead):
    """Wide layers go through the aligned cross-attention in blocks of channels, the [cross] query's softmax
    online over the blocks: the same outputs and gradients as one block, up to rounding."""
    from weightformer_hf.modeling import modeling_weightformer as mw

    torch.manual_seed(0)
    block = mw.WeightFormerBlock(wf.WeightFormerConfig(**SMALL))
    queries = torch.randn(2, lead + 40, 32, requires_grad=True)
    memory = torch.randn(2, 40, 3, 32) * 3  # spread scores: the online softmax's rescaling matters
    norms = []
    block.memory_norm.register_forward_hook(lambda module, args, out: norms.append(args[0].shape[1]))

    def run():
        out = block(queries, memory)
        return out, torch.autograd.grad(out.square().sum(), [queries, *block.parameters()])

    whole, whole_grads = run()
    monkeypatch.setattr(mw, "ALIGNED_BLOCK_BYTES", 7 * 3 * 32 * 4)  # at most 7 channels: 6 blocks of 6 or 7
    blocked, blocked_grads = run()
    assert norms == [40, 6, 7, 7, 6, 7, 7]
    torch.testing.assert_close(blocked, whole, rtol=1e-5, atol=1e-6)
    for a, b in zip(blocked_grads, whole_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "family,chunk_size,use_cross_token", [("mlp", 16, True), ("cnn1d", 6, True), ("mlp", 64, False)]
)
def test_aligned_cross_attention_reads_each_channels_own_tokens(family, chunk_size, use_cross_token):
    models = [make_model(family, seed) for seed in range(3)]
    teachers = wf.TeacherSet.from_models(models)
    options = dict(chunk_size=chunk_size, use_cross_token=use_cross_token, cross_attention="aligned")
    generator = wf.WeightFormerModel.for_teachers(teachers, **SMALL, **options)
    student = generator.generate_student(teachers, anchor=2).state_dict()
    for name, tensor in models[2].state_dict().items():  # the untrained generator keeps the anchor
        assert torch.equal(bits(student[name]), bits(tensor)), name
    generator = wf.WeightFormerModel.for_teachers(teachers, **SMALL, **options, align_teachers=False)
    perturb(generator, seed=4)
    generator.eval()
    with torch.no_grad():
        state = generator(teachers, anchor=2).student_state
        expected = _reference_student(generator, teachers, anchor=2)
        generator.config.cross_attention = "all"  # the same weights attending to every token differ
        everything = generator(teachers, anchor=2).student_state
    for name, tensor in expected.items():
        torch.testing.assert_close(state[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
        assert not torch.allclose(state[name], everything[name], rtol=1e-4, atol=1e-5), name


def test_multi_chunk_reference_also_matches_single_chunk_layers():
    """The loop reference is itself checked on the default (single-chunk) layout of another family."""
    models = [make_model("mlp", seed) for seed in range(2)]
    teachers = wf.TeacherSet.from_models(models)
    generator = wf.WeightFormerModel.for_teachers(teachers, **SMALL, chunk_size=64, align_teachers=False)
    perturb(generator, seed=2)
    with torch.no_grad():
        state = generator(teachers, anchor=0).student_state
        expected = _reference_student(generator, teachers, anchor=0)
    for name, tensor in expected.items():
        torch.testing.assert_close(state[name], tensor, rtol=1e-5, atol=1e-6, msg=name)


# ---------------------------------------------------------------------------------- gradient checkpointing
def test_gradient_checkpointing_gives_the_same_loss_and_gradients():
    models = [make_model("mlp", seed) for seed in range(3)]
    teachers = wf.TeacherSet.from_models(models)
    generator = wf.WeightFormerModel.for_teachers(teachers, **{**SMALL, "num_hidden_layers": 2}, dropout=0.1)
    perturb(generator)
    generator.train()
    inputs, labels = make_inputs("mlp", 8), torch.arange(8) % 10

    def loss_and_grads():
        generator.zero_grad()
        torch.manual_seed(7)  # dropout draws the same masks in both runs (checkpointing replays the RNG)
        state = generator(teachers, anchor=1).student_state
        loss = torch.nn.functional.cross_entropy(wf.run_student(teachers, state, inputs), labels)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in generator.named_parameters()}

    plain_loss, plain = loss_and_grads()
    with pytest.warns(FutureWarning):  # transformers 5 renamed it activation_checkpointing_enable
        generator.gradient_checkpointing_enable()
    calls = []
    for block in generator.blocks:
        assert block.gradient_checkpointing
        func = block._gradient_checkpointing_func
        block._gradient_checkpointing_func = lambda *a, _f=func, **kw: calls.append(1) or _f(*a, **kw)
    ckpt_loss, ckpt = loss_and_grads()
    assert len(calls) == 2 * len(teachers.layers[0])  # every block of every layer was checkpointed
    torch.testing.assert_close(ckpt_loss, plain_loss, rtol=1e-6, atol=1e-6)
    for name, grad in plain.items():
        torch.testing.assert_close(ckpt[name], grad, rtol=1e-6, atol=1e-6, msg=name)


# ---------------------------------------------------------------------------------- ablation switches
@pytest.mark.parametrize(
    "option,value",
    [("align_teachers", False), ("pool_aligned", False), ("use_cross_token", False), ("cross_attention", "all")],
)
def test_ablation_switches_keep_the_anchor_at_init_and_change_the_student(option, value):
    models = [make_model("mlp", seed) for seed in range(3)]
    teachers = wf.TeacherSet.from_models(models)
    generator = wf.WeightFormerModel.for_teachers(teachers, **SMALL, **{option: value})
    student = generator.generate_student(teachers, anchor=1).state_dict()
    for name, tensor in models[1].state_dict().items():
        assert torch.equal(bits(student[name]), bits(tensor)), name
    default = wf.WeightFormerModel.for_teachers(teachers, **SMALL)
    perturb(generator, seed=3)
    default.load_state_dict(generator.state_dict())  # same weights: only the switch differs
    a = generator(teachers, anchor=1).student_state
    b = default(teachers, anchor=1).student_state
    for name in a:
        assert not torch.allclose(a[name], b[name]), f"{option}={value!r} left {name} as the default computes it"


def test_alignment_off_equals_pre_aligned_teachers():
    """With alignment on, the generator sees each teacher permuted onto the anchor: exactly what alignment
    off computes from teachers that were aligned beforehand."""
    from weightformer_hf.alignment import permute_tensor, weight_matching

    models = [make_model("mlp", seed) for seed in range(3)]
    teachers = wf.TeacherSet.from_models(models)
    on = wf.WeightFormerModel.for_teachers(teachers, **SMALL)
    perturb(on)
    off = wf.WeightFormerModel.for_teachers(teachers, **SMALL, align_teachers=False)
    off.load_state_dict(on.state_dict())
    spec = teachers.family.permutation_spec(teachers.template)
    aligned = []
    for k, model in enumerate(models):
        state = model.state_dict()
        if k != 1:
            perms = weight_matching(spec, models[1].state_dict(), state, max_iter=SMALL["align_max_iter"])
            assert any(not torch.equal(p, torch.arange(len(p))) for p in perms.values())
            state = {n: permute_tensor(n, t, spec, perms) for n, t in state.items()}
        copy = make_model("mlp", 0)
        copy.load_state_dict(state)
        aligned.append(copy)
    a = on(teachers, anchor=1).student_state
    b = off(wf.TeacherSet.from_models(aligned), anchor=1).student_state
    for name in a:
        assert torch.equal(a[name], b[name]), name
    c = off(teachers, anchor=1).student_state
    assert all(not torch.equal(a[n], c[n]) for n in a)


@pytest.mark.parametrize("use_cross_token", [False, True])
def test_without_cross_token_layers_are_independent(use_cross_token):
    """Without [cross] (and without alignment, which couples layers through shared permutations), a layer's
    student tensors depend on that layer's teacher tensors only; with it, later layers see earlier ones."""
    models = [make_model("mlp", seed) for seed in range(3)]
    teachers = wf.TeacherSet.from_models(models)
    generator = wf.WeightFormerModel.for_teachers(
        teachers, **SMALL, align_teachers=False, use_cross_token=use_cross_token
    )
    perturb(generator)
    layers, _ = teachers.layers
    first = {t.name for t in layers[0].tensors}
    changed = make_model("mlp", 2)
    with torch.no_grad():
        for name in first:
            changed.get_parameter(name).mul_(1.5).add_(0.1)
    a = generator(teachers, anchor=0).student_state
    b = generator(wf.TeacherSet.from_models([*models[:2], changed]), anchor=0).student_state
    assert all(not torch.equal(a[n], b[n]) for n in first)
    later_equal = [torch.equal(a[n], b[n]) for n in a if n not in first]
    assert all(later_equal) if not use_cross_token else not any(later_equal)


def test_generation_without_autograd_gives_the_forwards_bits_with_it():
    """Without autograd the token additions, the other teachers' pooled mean and the blocks' MLP activation run
    in place (generation's memory): the same bits as the training forward."""
    models = [make_model("hf_resnet", seed) for seed in range(4)]
    teachers = wf.TeacherSet.from_models(models)
    generator = wf.WeightFormerModel.for_teachers(teachers, **SMALL)
    assert generator.config.pool_aligned
    perturb(generator)
    generator.eval()
    with_autograd = generator(teachers, anchor=2).student_state
    assert all(v.requires_grad for v in with_autograd.values() if v.is_floating_point())
    student = generator.generate_student(teachers, anchor=2).state_dict()
    changed = 0
    for name, tensor in with_autograd.items():
        assert torch.equal(bits(student[name]), bits(tensor.detach())), name
        changed += not torch.equal(student[name], models[2].state_dict()[name])
    assert changed > len(with_autograd) // 2  # it did generate


# -------------------------------------------------------------------------------------- token cache
def test_cached_teacher_tokens_give_the_same_student_and_follow_the_teachers():
    from weightformer_hf.modeling import modeling_weightformer as mw

    models = [make_model("hf_resnet", seed) for seed in range(3)]
    teachers = wf.TeacherSet.from_models(models)
    generator = wf.WeightFormerModel.for_teachers(teachers, **SMALL)
    perturb(generator)
    mw.clear_token_cache()
    cold = generator(teachers, anchor=1).student_state
    assert len(mw._TOKEN_CACHE) == 1
    for entry in mw._TOKEN_CACHE.values():  # the cache holds no graph and no gradient
        for inputs in entry.layers:
            for x in (inputs.content, inputs.scales, *inputs.anchor_tensors.values()):
                assert not x.requires_grad and x.grad_fn is None
    warm = generator(teachers, anchor=1).student_state
    assert len(mw._TOKEN_CACHE) == 1
    for name in cold:
        assert torch.equal(warm[name], cold[name]), name
    # gradients still flow through the cached path, BatchNorm statistics included
    loss = sum(v.float().pow(2).sum() for v in warm.values() if v.is_floating_point())
    loss.backward()
    assert all(p.grad is not None for p in generator.decoders.parameters())
    # another anchor, another order, another set: other entries, same answers as a cold cache
    for other, anchor in ((teachers, 0), (teachers.subset([2, 1, 0]), 1)):
        mw.clear_token_cache()
        generator(teachers, anchor=1)  # the entry each case must not be served from
        state = generator(other, anchor=anchor).student_state
        assert len(mw._TOKEN_CACHE) == 2
        mw.clear_token_cache()
        fresh = generator(other, anchor=anchor).student_state
        assert all(torch.equal(state[n], fresh[n]) for n in state)
    # a teacher modified in place is noticed
    generator(teachers, anchor=1)
    name = "resnet.embedder.embedder.convolution.weight"
    with torch.no_grad():
        teachers.state_dicts[2][name].mul_(2.0)
    changed = generator(teachers, anchor=1).student_state
    mw.clear_token_cache()
    fresh = generator(teachers, anchor=1).student_state
    assert all(torch.equal(changed[n], fresh[n]) for n in fresh)
    assert not torch.equal(changed[name], cold[name])
    # a TeacherSet built from other models with the same names (identities) is not mistaken for this one
    others = wf.TeacherSet.from_models([make_model("hf_resnet", seed) for seed in (5, 6, 7)])
    a = generator(others, anchor=1).student_state
    mw.clear_token_cache()
    b = generator(others, anchor=1).student_state
    assert all(torch.equal(a[n], b[n]) for n in a)
