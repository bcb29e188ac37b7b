"""WeightFormer configuration: the generator's hyper-parameters and the student architecture it serves."""

from __future__ import annotations

import os

from transformers import PreTrainedConfig


class WeightFormerConfig(PreTrainedConfig):
    r"""Configuration of a [`WeightFormerModel`].

    A saved WeightFormer knows what it generates: `student` describes the architecture family, the
    architecture's own config and the label names, and `student_layers` lists the generator layers
    (name, output channels, token width) that fix the shapes of the per-layer embedders.

    Args:
        hidden_size (`int`, defaults to 128): width `d` of tokens inside the generator.
        num_hidden_layers (`int`, defaults to 2): blocks (self-attention over the anchor's channels,
            cross-attention to the teachers' channels, MLP) applied to every student layer.
        num_attention_heads (`int`, defaults to 4): attention heads.
        intermediate_size (`int`, defaults to 256): hidden width of the blocks' MLP.
        chunk_size (`int`, defaults to 1024): longest token; wider channels (large fan-in) are split into
            chunks that are generated as separate tokens, which bounds embedder size and memory.
        dropout (`float`, defaults to 0.0): dropout on attention and MLP outputs.
        layer_norm_eps (`float`, defaults to 1e-5): LayerNorm epsilon.
        align_teachers (`bool`, defaults to `True`): weight-match every teacher to the anchor before
            tokenising, for families that declare channel-order groups.
        align_max_iter (`int`, defaults to 30): coordinate-ascent rounds of weight matching.
        use_cross_token (`bool`, defaults to `True`): carry a `[cross]` state from layer to layer.
        pool_aligned (`bool`, defaults to `True`): add the mean of the other teachers' aligned tokens of
            the same channel to each anchor query.
        cross_attention (`str`, defaults to `"aligned"`): what each anchor channel's query attends to in the
            cross-attention: `"aligned"`, only its own aligned channel in each teacher (K keys; the `[cross]`
            token still sees all); `"all"`, every teacher's every channel of the layer (K × C keys). The first
            costs K instead of K × C per query and measured as good (docs/experiments.md v23). A saved config
            without the key is a generator from before the option, which attended to all: it loads as `"all"`.
        shift_consistency_weight (`float`, defaults to 0.0): weight of the paper's shift-consistency loss
            (MSE between students generated from two orders of the other teachers); 0 disables it.
        initializer_range (`float`, defaults to 0.02): std of the normal init of linear layers.
        student (`dict`, *optional*): `{"family", "arch", "label_names"}` of the student architecture.
        student_layers (`list[dict]`, *optional*): `{"name", "channels", "width"}` per generator layer.
        training_pool (`list[str]`, *optional*): identities of the teachers the generator was trained on.
        heldout_results (`dict`, *optional*): held-out evaluation summary written by the training script.

    Removed options: `copy_path` and `mask_sparsity_weight` (the copy path and the memory gate measured no
    gain, docs/experiments.md). A saved config that has them switched off still loads (they are dropped);
    one that switches them on raises `ValueError`, since this version cannot build that generator.
    """

    model_type = "weightformer"

    def __init__(
        self,
        hidden_size: int = 128,
        num_hidden_layers: int = 2,
        num_attention_heads: int = 4,
        intermediate_size: int = 256,
        chunk_size: int = 1024,
        dropout: float = 0.0,
        layer_norm_eps: float = 1e-5,
        align_teachers: bool = True,
        align_max_iter: int = 30,
        use_cross_token: bool = True,
        pool_aligned: bool = True,
        cross_attention: str = "aligned",
        shift_consistency_weight: float = 0.0,
        initializer_range: float = 0.02,
        student: dict | None = None,
        student_layers: list[dict] | None = None,
        training_pool: list[str] | None = None,
        heldout_results: dict | None = None,
        **kwargs,
    ):
        _drop_removed_options(kwargs)
        if hidden_size % num_attention_heads != 0:
            raise ValueError(
                f"hidden_size ({hidden_size}) must be a multiple of num_attention_heads ({num_attention_heads})"
            )
        if cross_attention not in ("all", "aligned"):
            raise ValueError(f"cross_attention must be 'all' or 'aligned', not {cross_attention!r}")
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.chunk_size = chunk_size
        self.dropout = dropout
        self.layer_norm_eps = layer_norm_eps
        self.align_teachers = align_teachers
        self.align_max_iter = align_max_iter
        self.use_cross_token = use_cross_token
        self.pool_aligned = pool_aligned
        self.cross_attention = cross_attention
        self.shift_consistency_weight = shift_consistency_weight
        self.initializer_range = initializer_range
        self.student = student or {}
        self.student_layers = list(student_layers or [])
        self.training_pool = list(training_pool or [])
        self.heldout_results = heldout_results or {}
        super().__init__(**kwargs)

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs) -> WeightFormerConfig:
        """transformers' `from_dict` (used by `from_pretrained` and the Auto classes), except that a config
        saved before the `cross_attention` option existed loads as the `"all"` generator it was trained as."""
        if "cross_attention" not in config_dict:
            config_dict = {**config_dict, "cross_attention": "all"}
        return super().from_dict(config_dict, **kwargs)

    @classmethod
    def from_json_file(cls, json_file: str | os.PathLike) -> WeightFormerConfig:
        """A config from a `config.json`, through `from_dict` (transformers' calls the constructor directly, which
        would give an old file without `cross_attention` the new default)."""
        return cls.from_dict(cls._dict_from_json_file(json_file))


# option -> value that means "off": configs saved by earlier versions carry these keys
_REMOVED_OPTIONS = {"copy_path": False, "mask_sparsity_weight": 0.0}


def _drop_removed_options(kwargs: dict) -> None:
    """Pop options earlier versions had; raise `ValueError` if a config switches one on."""
    for name, off in _REMOVED_OPTIONS.items():
        if name in kwargs:
            value = kwargs.pop(name)
            if value not in (None, off):
                raise ValueError(
                    f"this WeightFormerConfig has {name}={value!r}, but this version of weightformer_hf removed "
                    f"the {name!r} option (it measured no gain, see docs/experiments.md); a generator trained with "
                    "it cannot be loaded here: use the weightformer_hf version it was trained with"
                )
