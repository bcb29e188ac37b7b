"""Top-1 accuracy as a local `evaluate` module: `evaluate.load("<path>/accuracy")` works offline.

evaluate 0.4.6 ships no metric scripts, and `evaluate.load("accuracy")` needs the Hub (and scikit-learn),
so the project keeps its own. One import per line: evaluate's dependency scanner misreads
`import a, b` (it would report a missing module named `a,`).
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = "Top-1 accuracy: the fraction of predictions equal to the references (optionally weighted)."

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[int]`): predicted labels.
    references (`list[int]`): ground-truth labels.
    sample_weight (`list[float]`, *optional*): per-sample weights.
Returns:
    accuracy (`float`): in [0, 1].
Examples:
    >>> metric = evaluate.load("weightformer_hf/metrics/accuracy")
    >>> metric.compute(predictions=[0, 1, 1], references=[0, 1, 0])
    {'accuracy': 0.6666666666666666}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Accuracy(evaluate.Metric):
    """Top-1 accuracy with int32 `predictions`/`references` features."""

    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("int32"), "references": datasets.Value("int32")}
            ),
        )

    def _compute(self, predictions, references, sample_weight=None):
        correct = np.asarray(predictions) == np.asarray(references)
        weights = np.ones(len(correct)) if sample_weight is None else np.asarray(sample_weight, dtype=float)
        return {
            "accuracy": float((correct * weights).sum() / weights.sum()) if len(correct) else float("nan")
        }
