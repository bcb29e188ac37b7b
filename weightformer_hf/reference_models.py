"""Small reference classifiers for MNIST-1D signals (40 samples per signal).

They are ordinary transformers models (config + `PreTrainedModel`), so teacher pools built from them are
real Hub-format repos: `save_pretrained` writes them and `AutoModel.from_pretrained` reads them back once
`weightformer_hf` is imported.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, PreTrainedConfig, PreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput


class MLPClassifierConfig(PreTrainedConfig):
    """Config of `MLPClassifier`: `in_features` → `hidden_sizes` (ReLU) → `num_labels`."""

    model_type = "wf_mlp"

    def __init__(self, in_features: int = 40, hidden_sizes: list[int] | tuple[int, ...] = (256, 256), **kwargs):
        self.in_features = in_features
        self.hidden_sizes = list(hidden_sizes)
        if "id2label" not in kwargs:  # a saved config's id2label decides the class count
            kwargs.setdefault("num_labels", 10)
        super().__init__(**kwargs)


class Conv1dClassifierConfig(PreTrainedConfig):
    """Config of `Conv1dClassifier`: strided 1-D convs (ReLU) → flatten → linear head."""

    model_type = "wf_cnn1d"

    def __init__(
        self,
        in_length: int = 40,
        channels: list[int] | tuple[int, ...] = (32, 32, 32),
        kernel_size: int = 5,
        stride: int = 2,
        **kwargs,
    ):
        self.in_length = in_length
        self.channels = list(channels)
        self.kernel_size = kernel_size
        self.stride = stride
        if "id2label" not in kwargs:  # a saved config's id2label decides the class count
            kwargs.setdefault("num_labels", 10)
        super().__init__(**kwargs)

    def output_length(self) -> int:
        length = self.in_length
        for _ in self.channels:
            length = (length + 2 * (self.kernel_size // 2) - self.kernel_size) // self.stride + 1
        return length


class _SignalClassifier(PreTrainedModel):
    main_input_name = "input_values"

    def _init_weights(self, module):
        # Default PyTorch init (kaiming-uniform) trains these small nets better than normal(0.02).
        if isinstance(module, (nn.Linear, nn.Conv1d)):
            module.reset_parameters()

    def forward(self, input_values: torch.Tensor, labels: torch.Tensor | None = None, **kwargs):
        logits = self.net(input_values)
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)


class MLPClassifier(_SignalClassifier):
    """A plain MLP classifier; the MNIST-1D reference teacher (40-256-256-10 by default)."""

    config_class = MLPClassifierConfig

    def __init__(self, config: MLPClassifierConfig):
        super().__init__(config)
        sizes = [config.in_features, *config.hidden_sizes]
        layers: list[nn.Module] = []
        for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
            layers += [nn.Linear(fan_in, fan_out), nn.ReLU()]
        layers.append(nn.Linear(sizes[-1], config.num_labels))
        self.net = nn.Sequential(*layers)
        self.post_init()


class Conv1dClassifier(_SignalClassifier):
    """A small 1-D CNN classifier for MNIST-1D signals."""

    config_class = Conv1dClassifierConfig

    def __init__(self, config: Conv1dClassifierConfig):
        super().__init__(config)
        layers: list[nn.Module] = [nn.Unflatten(1, (1, config.in_length))]
        in_ch = 1
        for out_ch in config.channels:
            layers += [
                nn.Conv1d(in_ch, out_ch, config.kernel_size, config.stride, config.kernel_size // 2),
                nn.ReLU(),
            ]
            in_ch = out_ch
        layers += [nn.Flatten(), nn.Linear(in_ch * config.output_length(), config.num_labels)]
        self.net = nn.Sequential(*layers)
        self.post_init()


def _register() -> None:
    for config_cls, model_cls in ((MLPClassifierConfig, MLPClassifier), (Conv1dClassifierConfig, Conv1dClassifier)):
        try:
            AutoConfig.register(config_cls.model_type, config_cls)
            AutoModel.register(config_cls, model_cls)
        except ValueError:  # already registered (module reloaded)
            pass


_register()
