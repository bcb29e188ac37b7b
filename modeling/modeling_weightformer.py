"""WeightFormer: a Transformer that reads K teachers' weights, layer by layer, and writes one student.

Data path, top to bottom:

1. **Tokens.** Each student layer (a conv/linear with its bias and BatchNorm, a LayerNorm, an embedding)
   becomes one token per output channel and teacher: the channel's slice of every tensor of the layer,
   flattened, scaled by the tensor's RMS over the teachers (positive tensors enter as logs). Teachers are
   first weight-matched to the anchor when the family declares channel-order groups. Channels wider than
   `chunk_size` are split into chunks, each a token of its own.
2. **Generator.** The anchor's tokens are the queries. Each block lets them attend to each other and a
   `[cross]` token carried over from the previous layer, then to the teachers' tokens of the layer: all of
   them, or (`cross_attention="aligned"`) each channel's own aligned token in every teacher (a set: no
   teacher ids, only an "is anchor" flag, so any K works and the order of the other teachers does not
   matter), then applies an MLP.
3. **Residual decoding.** A zero-initialised projection turns each query into a change of its channel:
   student = anchor + change (positive tensors: anchor · exp(change)). An untrained generator therefore
   returns the anchor bit for bit.
4. **Student.** The generated tensors are a full state dict, run with `torch.func.functional_call` so
   a loss on the student's outputs trains the generator.
"""

from __future__ import annotations

import copy
import math
import operator
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.utils import ModelOutput

from ..alignment import align_all_to_anchor, permute_tensor, permute_trailing, rows_are_channels
from ..allocator import release_free_memory
from ..errors import TeacherMismatchError
from ..families import LayerSpec
from ..teachers import TeacherSet, as_teacher_set, tensor_shape
from ..weight_files import is_lazy, tensor_rows
from .configuration_weightformer import WeightFormerConfig


@dataclass
class WeightFormerOutput(ModelOutput):
    """Output of [`WeightFormerModel.forward`].

    Args:
        student_state: the student's full state dict (floating tensors carry gradients to the generator).
        cross_states: the `[cross]` state after each student layer, shape `(num_layers, hidden_size)`.
    """

    student_state: dict[str, torch.Tensor] | None = None
    cross_states: torch.Tensor | None = None


@dataclass
class _LayerInputs:
    """What the generator reads of one layer (no gradients): see `WeightFormerModel._layer_inputs`.

    Cached inputs keep every teacher's tokens (`content`) and the anchor's tensors. Streamed ones
    (`streamed=True`) keep neither: `teacher_content(k)` builds one teacher's tokens when the layer is
    embedded, and the anchor's tensors are read when it is decoded, so one teacher's share of one layer is
    in memory at a time.
    """

    content: torch.Tensor | None  # (K, C, n_chunks, chunk): normalised tokens, zero-padded to whole chunks
    scales: torch.Tensor  # (W,): tensor units per normalised unit, per token column
    anchor_tensors: dict[str, torch.Tensor] | None  # the anchor's tensors, float32 on the device (cached)
    dtypes: dict[str, torch.dtype] | None  # the anchor's own dtypes, which the student keeps (cached)
    anchor_state: Mapping[str, torch.Tensor] | None = None  # where streamed inputs read the anchor from
    streamed: bool = False
    teacher_content: Callable[[int], torch.Tensor] | None = None  # streamed: k -> (C, n_chunks, chunk)
    num_teachers: int = 0

    def anchor(self, layer: LayerSpec, device: torch.device) -> tuple[dict[str, torch.Tensor], dict[str, torch.dtype]]:
        """The anchor's tensors of `layer`, float32 on `device`, and their own dtypes."""
        if self.anchor_tensors is not None:
            return self.anchor_tensors, self.dtypes
        tensors, dtypes = {}, {}
        for t in layer.tensors:
            tensor = self.anchor_state[t.name]
            tensors[t.name], dtypes[t.name] = tensor.to(device=device, dtype=torch.float32), tensor.dtype
        return tensors, dtypes


class _TokenCacheEntry:
    """Cached `_LayerInputs` of one (teacher set, anchor, device); valid while the teachers' tensors are the
    same objects, unmodified. Holds weak references only: it never keeps a teacher (or a lazily read tensor)
    alive."""

    def __init__(self, owner: dict, sources: list[torch.Tensor], layers: list[_LayerInputs]):
        self.owner = owner  # the set's alignment cache: shared by a set, its subsets and `.to()` copies
        self.refs = [(weakref.ref(t), t._version) for t in sources]
        self.layers = layers
        self.nbytes = sum(
            x.numel() * x.element_size() for li in layers for x in (li.content, li.scales, *li.anchor_tensors.values())
        )

    def matches(self, teachers: TeacherSet, sources: list[torch.Tensor]) -> bool:
        return (
            self.owner is teachers.alignment_cache
            and len(sources) == len(self.refs)
            and all(ref() is t and t._version == version for (ref, version), t in zip(self.refs, sources))
        )


# (lineage, identities, anchor, device, settings) -> entry, least recently used first
_TOKEN_CACHE: OrderedDict[tuple, _TokenCacheEntry] = OrderedDict()
TOKEN_CACHE_BYTES = 512 * 2**20  # entries beyond this (newest kept first) are dropped
# The aligned cross-attention takes layers whose keys are larger than this in blocks of channels (`aligned`).
# 1 MiB: each block holds about 5 buffers of its keys' size (norm, keys, values, two products); at 4 MiB they
# were 10 MiB of the presets' generator's peak on ResNet-50 K = 8 (docs/experiments.md v25). The MNIST-1D MLP
# pools' keys (256 channels × K ≤ 8 × d 128) still fit one block.
ALIGNED_BLOCK_BYTES = 1 * 2**20


def clear_token_cache() -> None:
    """Drop every cached teacher-token entry (they are rebuilt on the next forward)."""
    _TOKEN_CACHE.clear()


def chunk_layout(width: int, chunk_size: int) -> tuple[int, int]:
    """(number of chunks, chunk length) that split a token of `width` into near-equal chunks."""
    n_chunks = max(1, math.ceil(width / chunk_size))
    return n_chunks, math.ceil(width / n_chunks)


def block_memory(tokens: torch.Tensor, cross_attention: str) -> torch.Tensor:
    """What the blocks' cross-attention reads, from one layer's tokens `(K, C, n_chunks, d)`: per chunk, all
    K × C tokens `(n, K × C, d)` (`"all"`), or each channel's K aligned tokens `(n, C, K, d)` (`"aligned"`)."""
    if cross_attention == "aligned":
        return tokens.permute(2, 1, 0, 3)
    n_teachers, channels, n_chunks, dim = tokens.shape
    return tokens.permute(2, 0, 1, 3).reshape(n_chunks, n_teachers * channels, dim)


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

    def forward(self, queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        batch, n_q, dim = queries.shape
        heads, head_dim = self.num_heads, dim // self.num_heads
        q = self.q_proj(queries).view(batch, n_q, heads, head_dim).transpose(1, 2)
        k, v = self.kv_proj(keys).view(batch, keys.shape[1], 2, heads, head_dim).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        del q, k, v  # (without autograd) their memory takes the output's copy and projection
        return self.o_proj(out.transpose(1, 2).reshape(batch, n_q, dim))

    def aligned(
        self, queries: torch.Tensor, keys: torch.Tensor, norm: Callable[[torch.Tensor], torch.Tensor]
    ) -> torch.Tensor:
        """Each of the last C `queries` `(B, Q, d)` attends only to its own channel's K keys, `norm(keys[:, c])`
        of `keys` `(B, C, K, d)`; the Q - C queries before them (the `[cross]` token) attend to all C × K.

        Layers whose keys take more than `ALIGNED_BLOCK_BYTES` a chunk go through in blocks of channels, normalised
        and projected a block at a time (the `[cross]` query's softmax then runs online over the blocks), so
        no buffer of the layer's size is made beyond the keys themselves: ResNet-50's 2,048-channel layers,
        K = 8, d = 256, held about 8 such buffers of 16 MiB at once."""
        batch, n_q, dim = queries.shape
        channels, n_keys = keys.shape[1], keys.shape[2]
        heads, head_dim = self.num_heads, dim // self.num_heads
        dropout = self.dropout if self.training else 0.0
        q = self.q_proj(queries).view(batch, n_q, heads, head_dim)
        lead = n_q - channels
        # per chunk, not per batch: a streamed layer (one chunk at a time) must take the very steps a cached one
        # (all chunks at once) takes, so that both give the same bits
        n_blocks = math.ceil(channels / max(1, ALIGNED_BLOCK_BYTES // (n_keys * dim * keys.element_size())))
        bounds = [i * channels // n_blocks for i in range(n_blocks + 1)]  # even blocks: no last one of a few
        # keys and values projected apart: each is contiguous, so the [cross] query reads it as a view
        weight, bias = self.kv_proj.weight, self.kv_proj.bias
        projections = [(weight[i * dim : (i + 1) * dim], bias[i * dim : (i + 1) * dim]) for i in range(2)]
        out = q.new_empty(q.shape)  # (B, Q, H, hd): each block's rows are written into place, none concatenated
        running = None  # the [cross] query's online softmax over the blocks (max, sum, weighted values)
        for first, end in zip(bounds, bounds[1:]):
            memory = norm(keys[:, first:end])
            width = end - first
            k, v = (F.linear(memory, w, b).view(batch, width, n_keys, heads, head_dim) for w, b in projections)
            del memory
            # K keys per query: elementwise products instead of SDPA, whose kernels are made for long sequences
            scores = (q[:, lead + first : lead + first + width, None] * k).sum(-1) * head_dim**-0.5  # (B, c, K, H)
            weights = F.dropout(scores.softmax(dim=2), dropout, self.training)
            out[:, lead + first : lead + end] = (weights[..., None] * v).sum(2)
            if not lead:
                continue
            if width == channels:  # one block: SDPA over all C × K keys
                lead_q = q[:, :lead].transpose(1, 2)  # (B, H, L, hd)
                k_all, v_all = (t.reshape(batch, width * n_keys, heads, head_dim).transpose(1, 2) for t in (k, v))
                running = F.scaled_dot_product_attention(lead_q, k_all, v_all, dropout_p=dropout).transpose(1, 2)
                continue
            # blocks: products again (a matmul's kernel, and so its bits, may change with the number of chunks)
            k_all, v_all = (t.reshape(batch, 1, width * n_keys, heads, head_dim) for t in (k, v))
            part = (q[:, :lead, None] * k_all).sum(-1) * head_dim**-0.5  # (B, L, c × K, H)
            running = _online_softmax(running, part, v_all, dropout, self.training)
        if lead:  # one block: SDPA's output; several: the online softmax's weighted values over its sum
            single = isinstance(running, torch.Tensor)
            out[:, :lead] = running if single else running[2] / running[1].squeeze(2)[..., None]
        del q, k, v, running
        return self.o_proj(out.reshape(batch, n_q, dim))


def _online_softmax(running: tuple | None, scores: torch.Tensor, values: torch.Tensor, dropout: float, training: bool):
    """One block of keys of a softmax taken over several: `running` (max, sum, weighted values) of the blocks
    before (None for the first) updated with this block's `scores` `(B, L, n, H)` and `values`
    `(B, 1, n, H, hd)`. The attention's output is weighted values / sum."""
    peak = scores.amax(2, keepdim=True)
    if running is not None:
        peak = torch.maximum(running[0], peak)
    exp = (scores - peak).exp()
    total = exp.sum(2, keepdim=True)
    weighted = (F.dropout(exp, dropout, training)[..., None] * values).sum(2)  # (B, L, H, hd)
    if running is not None:
        rescale = (running[0] - peak).exp()
        total, weighted = running[1] * rescale + total, running[2] * rescale.squeeze(2)[..., None] + weighted
    return peak, total, weighted


class WeightFormerBlock(GradientCheckpointingLayer):
    """Pre-LN block: self-attention over the anchor's channels and [cross], cross-attention to the teachers'
    channels of the layer (all of them, or each channel's aligned ones), MLP."""

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

    def forward(self, queries: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        x = self.self_norm(queries)
        queries = queries + self.self_attn(x, x)
        del x
        # memory (B, K × C, d): every query attends to all of it; (B, C, K, d) (`cross_attention="aligned"`):
        # channel c's query to memory[:, c] only
        if memory.dim() == 4:
            queries = queries + self.cross_attn.aligned(self.cross_norm(queries), memory, self.memory_norm)
        else:
            queries = queries + self.cross_attn(self.cross_norm(queries), self.memory_norm(memory))
        if torch.is_grad_enabled():
            return queries + self.mlp(self.mlp_norm(queries))
        # without autograd (generation) the activation runs in place: one (tokens × intermediate) buffer fewer,
        # the same bits (ResNet-50's 2,048-channel layers, the presets' generator: 8 MiB)
        up, activation, down, dropout = self.mlp
        hidden = up(self.mlp_norm(queries))
        torch.ops.aten.gelu_(hidden, approximate=activation.approximate)
        return queries + dropout(down(hidden))


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
        self.blocks = nn.ModuleList(WeightFormerBlock(config) for _ in range(config.num_hidden_layers))
        self.final_norm = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    # -------------------------------------------------------------------------------------- construction
    @classmethod
    def for_teachers(cls, teachers: TeacherSet | Sequence[nn.Module], **generator_kwargs) -> WeightFormerModel:
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
            first = next((e, g) for e, g in zip(expected, got) if e != g) if len(expected) == len(got) else None
            raise TeacherMismatchError(
                f"this WeightFormer was built for layers {first[0] if first else len(expected)} but the teachers "
                f"have {first[1] if first else len(got)}"
            )

    # ------------------------------------------------------------------------------------------- forward
    def forward(self, teachers: TeacherSet, anchor: int = 0) -> WeightFormerOutput:
        """Generate the student's state dict from `teachers`, keeping gradients.

        Args:
            teachers: K ≥ 1 teachers of the architecture this generator serves.
            anchor: index of the teacher whose channel order (and values, at initialisation) the student keeps.

        There are no other arguments: transformers' machinery passes none to this forward (gradient
        checkpointing wraps the blocks, not the model), and an unknown keyword raises `TypeError`.
        """
        try:  # numpy and torch integers too
            anchor = operator.index(anchor)
        except TypeError:
            raise TypeError(f"anchor must be a teacher index (an int), not {anchor!r}") from None
        if not 0 <= anchor < len(teachers):
            raise IndexError(f"anchor {anchor} is out of range for {len(teachers)} teachers")
        self.check_teachers(teachers)
        device = self.cross_init.device
        layers, non_float = teachers.layers
        cross = self.cross_init
        student: dict[str, torch.Tensor] = {}
        cross_states = []
        for index, (layer, inputs) in enumerate(zip(layers, self._layer_inputs(teachers, anchor))):
            decrements, cross = self._generate_layer(index, layer, inputs, anchor, cross)
            cross_states.append(cross)
            # in place when nothing needs the unscaled values (generation): one layer-sized buffer fewer
            decrements = decrements * inputs.scales if decrements.requires_grad else decrements.mul_(inputs.scales)
            if inputs.streamed:  # the anchor read a block of rows at a time: no float32 copy of its whole tensors
                student.update(_apply_changes_in_blocks(layer, inputs.anchor_state, decrements, device))
            else:
                student.update(_apply_changes(layer, *inputs.anchor(layer, device), decrements))
            del decrements
            if inputs.streamed:  # large teachers: this layer's buffers go back before the next is read
                release_free_memory()
        for name in non_float:  # integer counters such as num_batches_tracked carry no learned weights
            student[name] = teachers.state_dicts[anchor][name].to(device)
        return WeightFormerOutput(student_state=student, cross_states=torch.stack(cross_states))

    def auxiliary_loss(self, teachers: TeacherSet, anchor: int, output: WeightFormerOutput) -> torch.Tensor | None:
        """The paper's shift-consistency loss, weighted by `shift_consistency_weight`; None when the weight is
        0 or there are fewer than 3 teachers.

        The paper shifts the teacher sequence, cutting one end. Order cannot change this generator's output,
        so the shift that remains is the cut: the student regenerated without the last non-anchor teacher
        should stay close (relative squared distance, averaged over tensors). (The paper's other auxiliary
        loss, mask sparsity, went with the memory gate it regularised: it measured no gain.)
        """
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
            return self.config.shift_consistency_weight * torch.stack(terms).mean()
        return None

    def _alignments(self, teachers: TeacherSet, anchor: int) -> list[dict[str, torch.Tensor]]:
        """Per teacher, the permutations that align it to the anchor (empty for the anchor itself)."""
        spec = teachers.family.permutation_spec(teachers.template) if self.config.align_teachers else {}
        if not spec:
            return [{} for _ in range(len(teachers))]
        # cached in memory (teachers.alignment_cache) and on disk (cache_root() / "alignments")
        return align_all_to_anchor(teachers, anchor, spec, max_iter=self.config.align_max_iter)

    def _layer_inputs(self, teachers: TeacherSet, anchor: int) -> Iterable[_LayerInputs]:
        """Per layer, the generator's input: aligned, normalised, chunked teacher tokens and the anchor's tensors.

        A pure function of the teachers, the anchor and the config's alignment and chunk settings, so it is
        computed without gradients and cached (`_TOKEN_CACHE`) across calls: training episodes that reuse a
        teacher set and anchor skip alignment permutations, stacking, normalisation and device copies. An
        entry is only used for the same teacher objects (the set's lineage, identities, device) whose tensors
        are the very same objects, unmodified in place (`Tensor._version`); anything else recomputes.
        Teachers read lazily from disk, and sets whose entry would not fit `TOKEN_CACHE_BYTES`, are streamed
        instead: one layer at a time, nothing kept.
        """
        device = self.cross_init.device
        layers, _ = teachers.layers
        entry_bytes = 4 * (len(teachers) + 1) * sum(s.numel() for s in teachers.shapes.values())
        if entry_bytes > TOKEN_CACHE_BYTES or any(is_lazy(sd) for sd in teachers.state_dicts):
            return self._build_layer_inputs(teachers, anchor, keep=False)
        sources = [sd[t.name] for sd in teachers.state_dicts for layer in layers for t in layer.tensors]
        key = (
            id(teachers.alignment_cache),
            tuple(info.identity for info in teachers.infos),
            anchor,
            str(device),
            self.config.align_teachers,
            self.config.align_max_iter,
            self.config.chunk_size,
        )
        entry = _TOKEN_CACHE.get(key)
        if entry is not None and entry.matches(teachers, sources):
            _TOKEN_CACHE.move_to_end(key)
            return entry.layers
        out = list(self._build_layer_inputs(teachers, anchor, keep=True))
        _TOKEN_CACHE[key] = _TokenCacheEntry(teachers.alignment_cache, sources, out)
        _TOKEN_CACHE.move_to_end(key)
        total = 0
        for k in reversed(list(_TOKEN_CACHE)):  # keep the newest entries within the byte budget
            total += _TOKEN_CACHE[k].nbytes
            if total > TOKEN_CACHE_BYTES:
                del _TOKEN_CACHE[k]
        return out

    def _build_layer_inputs(self, teachers: TeacherSet, anchor: int, keep: bool) -> Iterator[_LayerInputs]:
        """`_LayerInputs` of each layer in turn, built when asked for (`keep`: hold the anchor's tensors)."""
        perms = self._alignments(teachers, anchor)
        spec = teachers.family.permutation_spec(teachers.template) if perms else {}
        layers, _ = teachers.layers
        for index, layer in enumerate(layers):
            yield self._one_layer_inputs(teachers, anchor, index, layer, perms, spec, keep)

    @torch.no_grad()
    def _one_layer_inputs(self, teachers, anchor, index, layer, perms, spec, keep) -> _LayerInputs:
        device = self.cross_init.device
        n_chunks, chunk = chunk_layout(self.config.student_layers[index]["width"], self.config.chunk_size)
        states, padded, channels = teachers.state_dicts, n_chunks * chunk, layer.channels
        anchor_state = states[anchor]
        if keep:  # one pass: every teacher's raw tokens are written while the RMS sums accumulate
            content = torch.zeros(len(teachers), channels, padded, device=device)
            sums = [torch.zeros((), dtype=torch.float64, device=device) for _ in layer.tensors]
            for k, state in enumerate(states):
                _write_raw_tokens(layer, state, perms[k], spec, device, content[k], sums)
            tensor_scales = _rms_scales(layer, states, sums, device)
            _normalise_tokens(layer, states[0], content, tensor_scales)
            content = content.view(len(teachers), channels, n_chunks, chunk)
            inputs = _LayerInputs(content, _column_scales(layer, states[0], tensor_scales), None, None, anchor_state)
            inputs.anchor_tensors, inputs.dtypes = inputs.anchor(layer, device)
            inputs.anchor_state = None  # a cache entry holds no reference to a teacher
            return inputs
        # streamed: a first pass reads every teacher for the RMS sums and keeps nothing; each teacher's tokens
        # are then built when the layer is embedded
        sums = [torch.zeros((), dtype=torch.float64, device=device) for _ in layer.tensors]
        for k, state in enumerate(states):
            _write_raw_tokens(layer, state, perms[k], spec, device, None, sums)
        tensor_scales = _rms_scales(layer, states, sums, device)
        release_free_memory()  # the pass's row blocks stay resident otherwise, under the layer's token buffers

        def teacher_content(k: int) -> torch.Tensor:
            out = torch.zeros(channels, padded, device=device)
            _write_raw_tokens(layer, states[k], perms[k], spec, device, out, None)
            _normalise_tokens(layer, states[k], out, tensor_scales)
            return out.view(channels, n_chunks, chunk)

        return _LayerInputs(
            None, _column_scales(layer, states[0], tensor_scales), None, None, anchor_state, streamed=True,
            teacher_content=teacher_content, num_teachers=len(teachers),
        )  # fmt: skip

    def _generate_layer(
        self, index: int, layer: LayerSpec, inputs: _LayerInputs, anchor: int, cross: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One layer's decrements `(channels, width)` (negated changes, normalised units) and the next [cross]
        state, from the layer's chunked tokens `inputs.content` `(K, C, n_chunks, chunk)` (streamed inputs
        build and embed one teacher's tokens at a time)."""
        width = self.config.student_layers[index]["width"]
        n_chunks, chunk = chunk_layout(width, self.config.chunk_size)
        channels, embed = layer.channels, self.embedders[index]
        # Teacher by teacher in both paths, so that a streamed layer (which builds one teacher's raw tokens at a
        # time: embedded, they are d / chunk as large) gets the very bits a cached one does.
        if inputs.streamed:
            n_teachers, content_of = inputs.num_teachers, inputs.teacher_content
        else:
            n_teachers, content_of = inputs.content.shape[0], inputs.content.__getitem__
        embedded = None
        for k in range(n_teachers):
            one = embed(content_of(k))
            if embedded is None:  # stored chunk-major (n, K, C, d): the blocks' `memory` below is a view of it
                embedded = one.new_empty((n_chunks, n_teachers, channels, one.shape[-1])).permute(1, 2, 0, 3)
            embedded[k] = one
            del one
        chunk_ids = torch.arange(n_chunks, device=embedded.device) + self.chunk_offsets[index]
        roles = torch.zeros(n_teachers, dtype=torch.long, device=embedded.device)
        roles[anchor] = 1
        additions = (
            self.chunk_embed(chunk_ids)[:, None, :].transpose(0, 1),
            self.layer_embed.weight[index],
            self.role_embed(roles)[:, None, None, :],
        )
        # in place without autograd (generation): no token-sized intermediate sums, the same bits
        in_place = not (torch.is_grad_enabled() and (embedded.requires_grad or any(a.requires_grad for a in additions)))
        tokens = embedded
        del embedded
        for addition in additions:
            tokens = tokens.add_(addition) if in_place else tokens + addition
        # tokens: (K, C, n, d)

        queries = tokens[anchor]
        if self.config.pool_aligned and n_teachers > 1:
            # the mean of the others summed in place, teacher by teacher: `cat(...).mean(0)` gives the same bits
            # but copies K - 1 teachers' tokens first (ResNet-50's fc, K = 8: 14 MiB at the peak)
            others = None
            for k in (k for k in range(n_teachers) if k != anchor):
                others = tokens[k].clone() if others is None else others.add_(tokens[k])
            queries = queries + self.pool_proj(others.div_(n_teachers - 1))
        queries = queries.transpose(0, 1)  # (n, C, d): chunks are independent attention problems
        memory = block_memory(tokens, self.config.cross_attention)
        del tokens
        if self.config.use_cross_token:
            cross_in = cross.expand(n_chunks, 1, -1)
            queries = torch.cat([cross_in, queries], dim=1)
        if inputs.streamed:  # large layers: the raw tokens' and the pooling's freed buffers go back first
            release_free_memory()
        if inputs.streamed:  # chunk by chunk: the blocks' buffers (memory's norm, keys, values) are one chunk's
            queries = torch.cat([self._run_blocks(queries[c : c + 1], memory[c : c + 1]) for c in range(n_chunks)])
        else:  # (chunks are independent problems: either way gives the same bits at one
            # intra-op thread; with more, the last bits may differ)
            queries = self._run_blocks(queries, memory)
        del memory
        if inputs.streamed:  # and the blocks' before the decoded layer is taken
            release_free_memory()
        queries = self.final_norm(queries)
        if self.config.use_cross_token:
            cross, queries = queries[:, 0].mean(0), queries[:, 1:]
        if inputs.streamed and n_chunks > 1:  # decoded chunk by chunk into place: no second layer-sized buffer
            decrements = queries.new_empty((channels, n_chunks, chunk))
            for c in range(n_chunks):  # (a chunk's GEMM gives the bits of the batched one at one thread)
                decrements[:, c] = self.decoders[index](queries[c])
        else:
            decrements = self.decoders[index](queries).transpose(0, 1)  # (C, n, chunk), normalised units
        decrements = decrements.reshape(channels, n_chunks * chunk)[:, :width]
        return decrements, cross

    def _run_blocks(self, queries: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            queries = block(queries, memory)
        return queries

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

    Every generated tensor, BatchNorm statistics included, receives a gradient. `teachers.template` is left
    untouched (mode, device, modules): the student runs on a private copy of it (see `_functional_student`).
    """
    module = _functional_student(teachers.template, inputs.device)
    out = torch.func.functional_call(module, dict(student_state), (inputs,), strict=True)
    return out if isinstance(out, torch.Tensor) else out.logits


# template -> {device: private eval-mode copy whose BatchNorms run in plain ops}; weak, so a template that is
# no longer used frees its copies (a copy holds no reference to its template).
_FUNCTIONAL_STUDENTS: weakref.WeakKeyDictionary[nn.Module, dict[torch.device, nn.Module]] = weakref.WeakKeyDictionary()


def _functional_student(template: nn.Module, device: torch.device) -> nn.Module:
    """A private copy of `template` on `device`, in eval mode, BatchNorms swapped for `_DifferentiableBatchNorm`.

    Built once per template and device, so `run_student` never moves, re-moves or patches the template.
    """
    per_device = _FUNCTIONAL_STUDENTS.setdefault(template, {})
    module = per_device.get(device)
    if module is None:
        module = copy.deepcopy(template).to(device).eval()
        for sub in module.modules():
            if type(sub).forward is nn.modules.batchnorm._BatchNorm.forward and sub.track_running_stats:
                sub.__class__ = _differentiable_batch_norm_class(type(sub))
        per_device[device] = module
    return module


class _DifferentiableBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Eval-mode BatchNorm in plain ops: `native_batch_norm` refuses running statistics that require grad."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            return super().forward(x)
        shape = (1, -1) + (1,) * (x.dim() - 2)
        y = (x - self.running_mean.view(shape)) * torch.rsqrt(self.running_var + self.eps).view(shape)
        return y * self.weight.view(shape) + self.bias.view(shape) if self.affine else y


_BATCH_NORM_CLASSES: dict[type, type] = {}


def _differentiable_batch_norm_class(cls: type) -> type:
    """`cls` (BatchNorm1d/2d/3d, whose `forward` is the stock one) with `_DifferentiableBatchNorm`'s forward,
    keeping `cls`'s input checks (`_check_input_dim`) and `isinstance` relations."""
    if cls not in _BATCH_NORM_CLASSES:
        _BATCH_NORM_CLASSES[cls] = type(f"Differentiable{cls.__name__}", (_DifferentiableBatchNorm, cls), {})
    return _BATCH_NORM_CLASSES[cls]


# Rows of a wide tensor are aligned and copied in blocks of about this many bytes (bounded extra memory), and at
# least `_BLOCK_MIN_ROWS` rows. Each block is read, gathered, squared or changed into two or three buffers of its
# size: at 4 MiB they were about 7 MiB of ViT-B/32's peak at its last fc2. But each read of a lazy teacher has a
# fixed cost: VGG-11's fc1 rows are 98 KiB, and blocks of 10 rows made its warm generation 40 % slower
# (docs/experiments.md v25).
_BLOCK_BYTES = 1 * 2**20
_BLOCK_MIN_ROWS = 64


def _block_rows(width: int) -> int:
    """Rows per block of a tensor whose rows hold `width` float32 values."""
    return max(_BLOCK_MIN_ROWS, _BLOCK_BYTES // (4 * max(1, width)))


def _tensor_widths(layer: LayerSpec, state: Mapping[str, torch.Tensor]) -> list[int]:
    """Columns each tensor of `layer` takes in a channel token."""
    return [math.prod(tensor_shape(state, t.name)) // layer.channels for t in layer.tensors]


def _aligned_rows(t, state, perm, spec, channels: int, device) -> Iterator[tuple[slice | torch.Tensor, torch.Tensor]]:
    """One teacher's tensor `t` aligned to the anchor, as pieces `(rows, block)`: `block` `(n, width)` float32
    lands on `rows` of the layer's `(C, width)` layout. Tensors whose rows are channels come in blocks of rows
    (lazy teachers read just those rows from disk), others whole; so memory holds one block or one tensor."""
    width = math.prod(tensor_shape(state, t.name)) // channels
    if t.channel_axis == 0 and rows_are_channels(t.name, spec, channels):
        group = spec[t.name][0][0] if t.name in spec else None
        # content row r is the teacher's row perm[r]: its row s lands on row argsort(perm)[s]
        landing = torch.argsort(perm[group]).to(device) if group in perm else None
        rows = _block_rows(width)
        for r in range(0, channels, rows):
            block = permute_trailing(t.name, tensor_rows(state, t.name, r, r + rows), spec, perm)
            block = block.reshape(-1, width).to(device=device, dtype=torch.float32)
            yield (slice(r, r + rows) if landing is None else landing[r : r + rows]), block
    else:
        moved = permute_tensor(t.name, state[t.name], spec, perm).movedim(t.channel_axis, 0)
        yield slice(None), moved.reshape(channels, width).to(device=device, dtype=torch.float32)


def _write_raw_tokens(layer: LayerSpec, state, perm, spec, device, out: torch.Tensor | None, sums) -> None:
    """Write one teacher's aligned tensors of `layer`, not yet normalised, into its tokens `out` `(C, padded)`
    (None: write nothing), and add each non-positive tensor's sum of squares to `sums[i]` (None: skip)."""
    start = 0
    for i, (t, width) in enumerate(zip(layer.tensors, _tensor_widths(layer, state))):
        target = None if out is None else out[:, start : start + width]
        for rows, block in _aligned_rows(t, state, perm, spec, layer.channels, device):
            if target is not None and isinstance(rows, slice):
                target[rows] = block
            elif target is not None:
                target.index_copy_(0, rows, block)
            if sums is not None and not t.positive:
                sums[i] += block.pow(2).sum(dtype=torch.float64)
        start += width


def _rms_scales(layer: LayerSpec, state_dicts, sums, device) -> list[torch.Tensor]:
    """Per tensor of `layer`, its RMS over all teachers from the sums of squares (1 for positive tensors, which
    enter as logs): a symmetric function of the set, so the order of the teachers does not matter."""
    count = len(state_dicts) * layer.channels
    return [
        torch.ones((), device=device) if t.positive else (total / (count * width)).sqrt().float().clamp_min(1e-6)
        for t, total, width in zip(layer.tensors, sums, _tensor_widths(layer, state_dicts[0]))
    ]


def _normalise_tokens(layer: LayerSpec, state, tokens: torch.Tensor, scales: Sequence[torch.Tensor]) -> None:
    """In place, on tokens `(..., C, padded)`: each tensor's columns divided by its scale (positive tensors:
    their logs)."""
    start = 0
    for t, scale, width in zip(layer.tensors, scales, _tensor_widths(layer, state)):
        region = tokens[..., start : start + width]
        region.clamp_(min=1e-12).log_() if t.positive else region.div_(scale)
        start += width


def _column_scales(layer: LayerSpec, state, scales: Sequence[torch.Tensor]) -> torch.Tensor:
    """`(W,)`: tensor units per normalised unit, per token column."""
    return torch.cat([scale.expand(width) for scale, width in zip(scales, _tensor_widths(layer, state))])


def _apply_changes_in_blocks(
    layer: LayerSpec, anchor_state: Mapping[str, torch.Tensor], decrements: torch.Tensor, device: torch.device
) -> dict[str, torch.Tensor]:
    """`_apply_changes` for streamed layers, the same bits: tensors whose rows are channels are read from the
    anchor (lazily: just those rows) and changed a block of rows at a time, straight into the student's tensor
    of the anchor's dtype. Reading each whole tensor as float32 first held a third layer-sized buffer beside
    the decrements and the student's tensor (ViT-B/32's MLP weights: 9 MiB at the peak)."""
    out, start = {}, 0
    for t in layer.tensors:
        shape = tensor_shape(anchor_state, t.name)
        width = math.prod(shape) // layer.channels
        if t.positive or t.channel_axis != 0:  # small (norms, statistics) or not row-major: whole, as before
            value = anchor_state[t.name]
            changed = _changed_tensor(t, value.to(device=device, dtype=torch.float32), decrements[:, start:], layer)
            out[t.name] = changed.to(value.dtype)
        else:
            rows, new = _block_rows(width), None
            for r in range(0, layer.channels, rows):
                block = tensor_rows(anchor_state, t.name, r, r + rows)
                if new is None:
                    new = torch.empty(shape, dtype=block.dtype, device=device)
                decrement = decrements[r : r + rows, start : start + width].reshape(block.shape)
                new[r : r + rows] = block.to(device=device, dtype=torch.float32) - decrement
            out[t.name] = new
        start += width
    return out


def _apply_changes(
    layer: LayerSpec,
    anchor_tensors: dict[str, torch.Tensor],
    dtypes: Mapping[str, torch.dtype],
    decrements: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """Student tensors = anchor − decrement (positive tensors: anchor · exp(−decrement)).

    The generator predicts the change with its sign flipped because `anchor - (+0.0)` keeps every bit of
    the anchor, -0.0 included, whereas `anchor + 0.0` turns -0.0 into +0.0: a zero-initialised decoder
    (which outputs +0.0) then returns the anchor bit for bit.
    """
    out, start = {}, 0
    for t in layer.tensors:
        value = anchor_tensors[t.name]
        out[t.name] = _changed_tensor(t, value, decrements[:, start:], layer).to(dtypes[t.name])
        start += value.numel() // layer.channels
    return out


def _changed_tensor(t, value: torch.Tensor, decrements: torch.Tensor, layer: LayerSpec) -> torch.Tensor:
    """One tensor of the student, float32: `value` (the anchor's, float32) changed by the first columns of
    `decrements` `(C, ≥ width)` (see `_apply_changes`)."""
    width = value.numel() // layer.channels
    moved_shape = value.movedim(t.channel_axis, 0).shape
    decrement = decrements[:, :width].reshape(moved_shape).movedim(0, t.channel_axis)
    return value * torch.exp(-decrement) if t.positive else value - decrement
