"""WeightFormer: a Transformer that reads K teachers' weights, layer by layer, and writes one student.

Data path, top to bottom:

1. **Tokens.** Each student layer (a conv/linear with its bias and BatchNorm, a LayerNorm, an embedding)
   becomes one token per output channel and teacher: the channel's slice of every tensor of the layer,
   flattened, scaled by the tensor's RMS over the teachers (positive tensors enter as logs). Teachers are
   first weight-matched to the anchor when the family declares channel-order groups. Channels wider than
   `chunk_size` are split into chunks, each a token of its own.
2. **Generator.** The anchor's tokens are the queries. Each block lets them attend to each other and a
   `[cross]` token carried over from the previous layer, then to every teacher's tokens of the layer
   (a set: no teacher ids, only an "is anchor" flag, so any K works and the order of the other teachers
   does not matter), then applies an MLP.
3. **Residual decoding.** A zero-initialised projection turns each query into a change of its channel:
   student = anchor + change (positive tensors: anchor · exp(change)). An untrained generator therefore
   returns the anchor bit for bit.
4. **Student.** The generated tensors are a full state dict, run with `torch.func.functional_call` so
   a loss on the student's outputs trains the generator.
"""

from __future__ import annotations

import math
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.utils import ModelOutput

from ..alignment import align_to_anchor, permute_tensor
from ..errors import TeacherMismatchError
from ..families import LayerSpec
from ..teachers import TeacherSet
from .configuration_weightformer import WeightFormerConfig


@dataclass
class WeightFormerOutput(ModelOutput):
    """Output of [`WeightFormerModel.forward`].

    Args:
        student_state: the student's full state dict (floating tensors carry gradients to the generator).
        cross_states: the `[cross]` state after each student layer, shape `(num_layers, hidden_size)`.
        mask_sparsity: mean of the soft memory gate (only when `mask_sparsity_weight > 0`).
    """

    student_state: dict[str, torch.Tensor] | None = None
    cross_states: torch.Tensor | None = None
    mask_sparsity: torch.Tensor | None = None


def chunk_layout(width: int, chunk_size: int) -> tuple[int, int]:
    """(number of chunks, chunk length) that split a token of `width` into near-equal chunks."""
    n_chunks = max(1, math.ceil(width / chunk_size))
    return n_chunks, math.ceil(width / n_chunks)


def describe_layers(teachers: TeacherSet) -> list[dict]:
    """The `student_layers` table of a config: name, channels and token width of each layer."""
    layers, _ = teachers.layers
    return [
        {"name": layer.name, "channels": layer.channels, "width": layer.token_width(teachers.shapes)}
        for layer in layers
    ]


class WeightFormerAttention(nn.Module):
    """Multi-head attention of `queries` over `keys` (batched over chunk index), via SDPA."""

    def __init__(self, config: WeightFormerConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.q_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.kv_proj = nn.Linear(config.hidden_size, 2 * config.hidden_size)
        self.o_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout = config.dropout

    def forward(
        self, queries: torch.Tensor, keys: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        batch, n_q, dim = queries.shape
        heads, head_dim = self.num_heads, dim // self.num_heads
        q = self.q_proj(queries).view(batch, n_q, heads, head_dim).transpose(1, 2)
        k, v = self.kv_proj(keys).view(batch, keys.shape[1], 2, heads, head_dim).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias, dropout_p=self.dropout if self.training else 0.0
        )
        return self.o_proj(out.transpose(1, 2).reshape(batch, n_q, dim))


class WeightFormerBlock(GradientCheckpointingLayer):
    """Pre-LN block: self-attention over the anchor's channels and [cross], cross-attention to all
    teachers' channels of the layer, MLP."""

    def __init__(self, config: WeightFormerConfig):
        super().__init__()
        eps = config.layer_norm_eps
        self.self_norm = nn.LayerNorm(config.hidden_size, eps=eps)
        self.self_attn = WeightFormerAttention(config)
        self.cross_norm = nn.LayerNorm(config.hidden_size, eps=eps)
        self.memory_norm = nn.LayerNorm(config.hidden_size, eps=eps)
        self.cross_attn = WeightFormerAttention(config)
        self.mlp_norm = nn.LayerNorm(config.hidden_size, eps=eps)
        self.mlp = nn.Sequential(
            nn.Linear(config.hidden_size, config.intermediate_size),
            nn.GELU(),
            nn.Linear(config.intermediate_size, config.hidden_size),
            nn.Dropout(config.dropout),
        )

    def forward(self, queries: torch.Tensor, memory: torch.Tensor, memory_bias: torch.Tensor | None = None):
        x = self.self_norm(queries)
        queries = queries + self.self_attn(x, x)
        queries = queries + self.cross_attn(self.cross_norm(queries), self.memory_norm(memory), memory_bias)
        return queries + self.mlp(self.mlp_norm(queries))


class WeightFormerPreTrainedModel(PreTrainedModel):
    config_class = WeightFormerConfig
    base_model_prefix = "weightformer"
    main_input_name = "teachers"
    supports_gradient_checkpointing = True
    _no_split_modules = ["WeightFormerBlock"]

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, WeightFormerModel):
            init.normal_(module.cross_init, std=self.config.initializer_range)
            # Zero output projections: the untrained generator returns the anchor exactly.
            for decoder in module.decoders:
                init.zeros_(decoder.weight)
                init.zeros_(decoder.bias)
            if module.config.copy_path:
                init.zeros_(module.copy_gate.weight)
                init.zeros_(module.copy_gate.bias)


class WeightFormerModel(WeightFormerPreTrainedModel):
    """Generates a full student (every parameter and BatchNorm statistic) from K teachers.

    Build an untrained generator for a teacher set with [`WeightFormerModel.for_teachers`], train it with
    `examples/train.py`, and call [`WeightFormerModel.generate_student`] for any K ≥ 1 teachers of the
    architecture it serves (its config's `student`).
    """

    def __init__(self, config: WeightFormerConfig):
        super().__init__(config)
        d = config.hidden_size
        layouts = [chunk_layout(layer["width"], config.chunk_size) for layer in config.student_layers]
        self.embedders = nn.ModuleList(nn.Linear(chunk, d) for _, chunk in layouts)
        self.decoders = nn.ModuleList(nn.Linear(d, chunk) for _, chunk in layouts)
        self.chunk_offsets = [sum(n for n, _ in layouts[:i]) for i in range(len(layouts))]
        self.chunk_embed = nn.Embedding(max(1, sum(n for n, _ in layouts)), d)
        self.layer_embed = nn.Embedding(max(1, len(layouts)), d)
        self.role_embed = nn.Embedding(2, d)  # 0: another teacher, 1: the anchor
        self.pool_proj = nn.Linear(d, d)
        self.cross_init = nn.Parameter(torch.zeros(d))
        self.memory_gate = nn.Linear(d, 1) if config.mask_sparsity_weight > 0 else None
        if config.copy_path:
            self.copy_query = nn.Linear(d, d)
            self.copy_key = nn.Linear(d, d)
            self.copy_gate = nn.Linear(d, 1)
        self.blocks = nn.ModuleList(WeightFormerBlock(config) for _ in range(config.num_hidden_layers))
        self.final_norm = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    # -------------------------------------------------------------------------------------- construction
    @classmethod
    def for_teachers(
        cls, teachers: TeacherSet | Sequence[nn.Module], **generator_kwargs
    ) -> WeightFormerModel:
        """An untrained generator whose config describes the architecture and labels of `teachers`."""
        teachers = as_teacher_set(teachers)
        config = WeightFormerConfig(
            student=teachers.describe(), student_layers=describe_layers(teachers), **generator_kwargs
        )
        return cls(config)

    def check_teachers(self, teachers: TeacherSet) -> None:
        """Raise `TeacherMismatchError` naming both architectures if `teachers` do not fit this generator."""
        teachers.check_matches(self.config.student, what="this WeightFormer")
        expected = [(x["name"], x["channels"], x["width"]) for x in self.config.student_layers]
        got = [(x["name"], x["channels"], x["width"]) for x in describe_layers(teachers)]
        if expected != got:
            first = (
                next((e, g) for e, g in zip(expected, got) if e != g) if len(expected) == len(got) else None
            )
            raise TeacherMismatchError(
                f"this WeightFormer was built for layers {first[0] if first else len(expected)} but the teachers "
                f"have {first[1] if first else len(got)}"
            )

    # ------------------------------------------------------------------------------------------- forward
    def forward(self, teachers: TeacherSet, anchor: int = 0, **kwargs) -> WeightFormerOutput:
        """Generate the student's state dict from `teachers`, keeping gradients.

        Args:
            teachers: K ≥ 1 teachers of the architecture this generator serves.
            anchor: index of the teacher whose channel order (and values, at initialisation) the student keeps.
        """
        if not 0 <= anchor < len(teachers):
            raise IndexError(f"anchor {anchor} is out of range for {len(teachers)} teachers")
        self.check_teachers(teachers)
        device = self.cross_init.device
        layers, non_float = teachers.layers
        perms = self._alignments(teachers, anchor)
        spec = teachers.family.permutation_spec(teachers.template) if perms else {}
        cross = self.cross_init
        student: dict[str, torch.Tensor] = {}
        cross_states, gates = [], []
        for index, layer in enumerate(layers):
            tensors = [
                {t.name: permute_tensor(t.name, sd[t.name], spec, perms[k]) for t in layer.tensors}
                for k, sd in enumerate(teachers.state_dicts)
            ]
            tensors = [{n: v.to(device=device, dtype=torch.float32) for n, v in td.items()} for td in tensors]
            decrements, cross, gate = self._generate_layer(index, layer, tensors, anchor, cross)
            cross_states.append(cross)
            if gate is not None:
                gates.append(gate)
            student.update(_apply_changes(layer, tensors[anchor], decrements, teachers.state_dicts[anchor]))
        for name in non_float:  # integer counters such as num_batches_tracked carry no learned weights
            student[name] = teachers.state_dicts[anchor][name].to(device)
        return WeightFormerOutput(
            student_state=student,
            cross_states=torch.stack(cross_states),
            mask_sparsity=torch.stack(gates).mean() if gates else None,
        )

    def auxiliary_loss(
        self, teachers: TeacherSet, anchor: int, output: WeightFormerOutput
    ) -> torch.Tensor | None:
        """The paper's optional auxiliary losses, weighted by the config (None when both are off).

        - mask sparsity: mean of the soft gate over memory tokens (`mask_sparsity_weight`);
        - shift consistency (`shift_consistency_weight`): the paper shifts the teacher sequence, cutting one
          end. Order cannot change this generator's output, so the shift that remains is the cut: the
          student regenerated without the last non-anchor teacher should stay close (relative squared
          distance, averaged over tensors).
        """
        loss = None
        if self.config.mask_sparsity_weight > 0 and output.mask_sparsity is not None:
            loss = self.config.mask_sparsity_weight * output.mask_sparsity
        if self.config.shift_consistency_weight > 0 and len(teachers) > 2:
            cut = max(i for i in range(len(teachers)) if i != anchor)
            keep = [i for i in range(len(teachers)) if i != cut]
            shifted = self(teachers.subset(keep), anchor=keep.index(anchor)).student_state
            terms = [
                (output.student_state[n] - shifted[n]).pow(2).sum()
                / output.student_state[n].detach().pow(2).sum().clamp_min(1e-12)
                for n in shifted
                if shifted[n].is_floating_point()
            ]
            consistency = self.config.shift_consistency_weight * torch.stack(terms).mean()
            loss = consistency if loss is None else loss + consistency
        return loss

    def _alignments(self, teachers: TeacherSet, anchor: int) -> list[dict[str, torch.Tensor]]:
        """Per teacher, the permutations that align it to the anchor (empty for the anchor itself)."""
        spec = teachers.family.permutation_spec(teachers.template) if self.config.align_teachers else {}
        if not spec:
            return [{} for _ in range(len(teachers))]
        # cached in memory (teachers.alignment_cache) and on disk (cache_root() / "alignments")
        return [
            {} if k == anchor else align_to_anchor(teachers, anchor, k, spec, max_iter=self.config.align_max_iter)
            for k in range(len(teachers))
        ]

    def _generate_layer(
        self,
        index: int,
        layer: LayerSpec,
        tensors: list[dict[str, torch.Tensor]],
        anchor: int,
        cross: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """One layer's decrements `(channels, width)` (negated changes, in tensor units), the next [cross]
        state and the memory gate's mean."""
        n_teachers, channels = len(tensors), layer.channels
        content, scales = _layer_content(layer, tensors)  # (K, C, W), (W,)
        width = content.shape[-1]
        n_chunks, chunk = chunk_layout(width, self.config.chunk_size)
        content = F.pad(content, (0, n_chunks * chunk - width)).view(n_teachers, channels, n_chunks, chunk)
        chunk_ids = torch.arange(n_chunks, device=content.device) + self.chunk_offsets[index]
        tokens = self.embedders[index](content) + self.chunk_embed(chunk_ids)[:, None, :].transpose(0, 1)
        tokens = tokens + self.layer_embed.weight[index]
        roles = torch.zeros(n_teachers, dtype=torch.long, device=content.device)
        roles[anchor] = 1
        tokens = tokens + self.role_embed(roles)[:, None, None, :]  # (K, C, n, d)

        queries = tokens[anchor]
        if self.config.pool_aligned and n_teachers > 1:
            others = torch.cat([tokens[:anchor], tokens[anchor + 1 :]]).mean(0)
            queries = queries + self.pool_proj(others)
        queries = queries.transpose(0, 1)  # (n, C, d): chunks are independent attention problems
        memory = tokens.permute(2, 0, 1, 3).reshape(n_chunks, n_teachers * channels, -1)
        if self.config.use_cross_token:
            cross_in = cross.expand(n_chunks, 1, -1)
            queries = torch.cat([cross_in, queries], dim=1)
        bias, gate_mean = None, None
        if self.memory_gate is not None:
            log_gate = F.logsigmoid(self.memory_gate(memory).squeeze(-1) + 4.0)  # starts near fully open
            bias = log_gate[:, None, None, :]
            gate_mean = log_gate.exp().mean()
        for block in self.blocks:
            queries = block(queries, memory, bias)
        queries = self.final_norm(queries)
        if self.config.use_cross_token:
            cross, queries = queries[:, 0].mean(0), queries[:, 1:]
        decrements = self.decoders[index](queries)  # (n, C, chunk), normalised units
        if self.config.copy_path:
            decrements = decrements + self._copy_decrement(queries, tokens, content, anchor)
        decrements = decrements.transpose(0, 1).reshape(channels, n_chunks * chunk)[:, :width]
        return decrements * scales, cross, gate_mean

    def _copy_decrement(
        self, queries: torch.Tensor, tokens: torch.Tensor, content: torch.Tensor, anchor: int
    ) -> torch.Tensor:
        """Gated pull of each channel towards a learned mix of the teachers' aligned values of that channel.

        The mix is a softmax over the K teachers (anchor included) of the same channel, so the generator can
        copy exact values at full precision rather than through the d-wide decoder. The gate starts at
        zero, which keeps the untrained student equal to the anchor (a ±0 product added to the decoder's
        +0.0 gives +0.0).
        """
        q = self.copy_query(queries)  # (n, C, d)
        keys = self.copy_key(tokens).permute(2, 1, 0, 3)  # (n, C, K, d)
        weights = torch.einsum("ncd,nckd->nck", q, keys).div(math.sqrt(q.shape[-1])).softmax(-1)
        values = content.permute(2, 1, 0, 3)  # (n, C, K, chunk)
        mix = torch.einsum("nck,nckw->ncw", weights, values)
        return self.copy_gate(queries) * (values[:, :, anchor] - mix)

    # ---------------------------------------------------------------------------------------- generation
    @torch.no_grad()
    def generate_student(
        self,
        teachers: TeacherSet | Sequence[nn.Module],
        anchor: int = 0,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> nn.Module:
        """A ready student of the teachers' class, in eval mode, generated without gradients.

        The generator's own train/eval mode is left as it was.
        """
        teachers = as_teacher_set(teachers)
        was_training = self.training
        self.eval()
        try:
            state = self(teachers, anchor=anchor).student_state
        finally:
            self.train(was_training)
        student = teachers.build_student({k: v.detach().cpu() for k, v in state.items()})
        if device is not None or dtype is not None:
            student = student.to(device=device, dtype=dtype)
        return student.eval()

    def push_to_hub(self, repo_id: str, **kwargs):
        """Push weights, config and a generator model card (family, training pool, held-out results) in
        one commit; see `weightformer_hf.push.weightformer_push_to_hub`."""
        from ..push import weightformer_push_to_hub

        return weightformer_push_to_hub(self, repo_id, **kwargs)

    def student_logits(
        self, teachers: TeacherSet, student_state: Mapping[str, torch.Tensor], inputs: torch.Tensor
    ) -> torch.Tensor:
        """The student's logits on `inputs`, differentiable with respect to `student_state`."""
        return run_student(teachers, student_state, inputs)


def run_student(teachers: TeacherSet, student_state: Mapping[str, torch.Tensor], inputs: torch.Tensor) -> torch.Tensor:
    """Logits of the architecture of `teachers` with weights `student_state`, via `functional_call`.

    Every generated tensor, BatchNorm statistics included, receives a gradient.
    """
    template = teachers.template
    if next(iter(template.parameters())).device != inputs.device:
        template.to(inputs.device)
    template.eval()
    _make_batch_norm_differentiable(template)
    out = torch.func.functional_call(template, dict(student_state), (inputs,), strict=True)
    return out if isinstance(out, torch.Tensor) else out.logits


def _batch_norm_eval(self: nn.modules.batchnorm._BatchNorm, x: torch.Tensor) -> torch.Tensor:
    """Eval-mode BatchNorm in plain ops: `native_batch_norm` refuses running statistics that require grad."""
    if self.training:
        return type(self).forward(self, x)
    shape = (1, -1) + (1,) * (x.dim() - 2)
    y = (x - self.running_mean.view(shape)) * torch.rsqrt(self.running_var + self.eps).view(shape)
    return y * self.weight.view(shape) + self.bias.view(shape) if self.affine else y


def _make_batch_norm_differentiable(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats:
            module.forward = types.MethodType(_batch_norm_eval, module)


def as_teacher_set(teachers: TeacherSet | Sequence[nn.Module]) -> TeacherSet:
    return teachers if isinstance(teachers, TeacherSet) else TeacherSet.from_models(list(teachers))


def _layer_content(
    layer: LayerSpec, tensors: list[dict[str, torch.Tensor]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per teacher, the layer's channel tokens `(K, C, W)`, normalised, and the per-column scales `(W,)`.

    Each tensor is divided by its RMS over all teachers (a symmetric function of the set, so the order of
    the teachers does not matter); positive tensors enter as logs, unscaled.
    """
    parts, scales = [], []
    for t in layer.tensors:
        stack = torch.stack([td[t.name] for td in tensors])  # (K, *shape)
        stack = stack.movedim(t.channel_axis + 1, 1).reshape(len(tensors), layer.channels, -1)
        if t.positive:
            stack = stack.clamp_min(1e-12).log()
            scale = stack.new_ones(())
        else:
            scale = stack.pow(2).mean().sqrt().clamp_min(1e-6)
        parts.append(stack / scale)
        scales.append(scale.expand(stack.shape[-1]))
    return torch.cat(parts, dim=-1), torch.cat(scales)


def _apply_changes(
    layer: LayerSpec,
    anchor_tensors: dict[str, torch.Tensor],
    decrements: torch.Tensor,
    anchor_state: Mapping[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """Student tensors = anchor − decrement (positive tensors: anchor · exp(−decrement)).

    The generator predicts the change with its sign flipped because `anchor - (+0.0)` keeps every bit of
    the anchor, -0.0 included, whereas `anchor + 0.0` turns -0.0 into +0.0: a zero-initialised decoder
    (which outputs +0.0) then returns the anchor bit for bit.
    """
    out, start = {}, 0
    for t in layer.tensors:
        value = anchor_tensors[t.name]
        moved_shape = value.movedim(t.channel_axis, 0).shape
        width = value.numel() // layer.channels
        decrement = decrements[:, start : start + width].reshape(moved_shape).movedim(0, t.channel_axis)
        start += width
        new = value * torch.exp(-decrement) if t.positive else value - decrement
        out[t.name] = new.to(anchor_state[t.name].dtype)
    return out
