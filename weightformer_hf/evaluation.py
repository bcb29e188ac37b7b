"""Classification metrics used everywhere: accuracy, NLL, ECE, gain recovered, agreement."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F


def logits_of(output) -> torch.Tensor:
    """Logits from a timm (tensor) or transformers (`.logits`) forward."""
    return output if isinstance(output, torch.Tensor) else output.logits


def check_finite_logits(logits: torch.Tensor, teacher: str) -> None:
    """Raise `InvalidWeightsError` if a teacher's `(N, C)` logits hold NaN or inf: finite weights whose outputs
    overflow float32 give no distillation target."""
    from .errors import InvalidWeightsError

    bad = int((~torch.isfinite(logits)).any(-1).sum())
    if bad:
        raise InvalidWeightsError(
            f"teacher {teacher!r} gives NaN or inf logits on {bad} of {len(logits)} rows of the data: its weights or "
            "the inputs' scale overflow float32"
        )


@torch.no_grad()
def predict_logits(
    forward: Callable[[torch.Tensor], torch.Tensor], inputs: torch.Tensor, batch_size: int = 1024
) -> torch.Tensor:
    """`forward` applied to `inputs` in batches, concatenated (on the CPU, fp32)."""
    return torch.cat(
        [forward(inputs[i : i + batch_size]).float().cpu() for i in range(0, len(inputs), batch_size)]
    )


def ensemble_probs(logits: Sequence[torch.Tensor]) -> torch.Tensor:
    """The probability-average ensemble of K models' logits."""
    return torch.stack([F.softmax(x.float(), dim=-1) for x in logits]).mean(0)


def accuracy(probs_or_logits: torch.Tensor, labels: torch.Tensor) -> float:
    return (probs_or_logits.argmax(-1) == labels).float().mean().item()


def nll(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Negative log-likelihood of probabilities (not logits)."""
    return -probs.clamp_min(1e-12).log().gather(1, labels[:, None]).mean().item()


def ece(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 10) -> float:
    """Expected calibration error with `n_bins` equal-width confidence bins."""
    confidence, prediction = probs.max(-1)
    correct = (prediction == labels).float()
    bins = torch.clamp((confidence * n_bins).long(), max=n_bins - 1)
    total = torch.zeros(())
    for b in range(n_bins):
        mask = bins == b
        if mask.any():
            total += mask.float().mean() * (confidence[mask].mean() - correct[mask].mean()).abs()
    return total.item()


def gain_recovered(acc: float, single_mean: float, ensemble: float) -> float:
    """G = (acc − mean single) / (ensemble − mean single); NaN when the ensemble gains nothing."""
    gap = ensemble - single_mean
    return (acc - single_mean) / gap if abs(gap) > 1e-12 else float("nan")


def agreement(probs_a: torch.Tensor, probs_b: torch.Tensor) -> float:
    """Fraction of samples on which two models predict the same class."""
    return (probs_a.argmax(-1) == probs_b.argmax(-1)).float().mean().item()


def classification_metrics(probs: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    return {"accuracy": accuracy(probs, labels), "nll": nll(probs, labels), "ece": ece(probs, labels)}
