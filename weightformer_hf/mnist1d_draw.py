"""MNIST-1D drawn as `mnist1d.data.make_dataset` draws it, with its arithmetic over all samples at once.

`make_dataset` transforms one sample at a time, and most of its time is building scipy interpolators:
about 0.8 ms a sample, or 50 s of the default training run's first 60,000 samples on a 2-core AMD EPYC.
Here the random draws are the same calls on numpy's global generator, in the same order, so the stream is
the same; the transforms then run on arrays of samples with the operations `make_dataset` applies to each
(`np.interp`, which scipy's linear `interp1d` delegates to for 1-D float data, and the same Gaussian filter
along rows). `tests/test_data.py` checks the result against `make_dataset` bit for bit.
"""

from __future__ import annotations

import numpy as np
from mnist1d.data import get_templates
from mnist1d.utils import set_seed
from scipy.ndimage import gaussian_filter1d


def _draws(args, n: int, length: int) -> dict[str, np.ndarray]:
    """Every random number of `n` samples, drawn in `mnist1d.transform.transform`'s order."""
    out = {
        "pad": np.empty(n), "scale": np.empty(n), "shift": np.empty(n, dtype=np.int64),
        "corr": np.empty((n, length)), "iid": np.empty((n, length)), "shear": np.empty(n),
    }  # fmt: skip
    for i in range(n):
        out["pad"][i] = np.random.rand()
        out["scale"][i] = np.random.rand()
        out["shift"][i] = np.random.choice(args.max_translation)
        out["corr"][i] = args.corr_noise_scale * np.random.randn(length)
        out["iid"][i] = args.iid_noise_scale * np.random.randn(length)
        out["shear"][i] = np.random.rand()
    return out


def _interpolate_rows(rows: np.ndarray, lengths: np.ndarray, size: int) -> np.ndarray:
    """`mnist1d.transform.interpolate` of each row's first `lengths[i]` values to `size` points."""
    new_scale = np.linspace(0, 1, size)
    out = np.empty((len(rows), size))
    scales = {int(n): np.linspace(0, 1, int(n)) for n in np.unique(lengths)}
    for i, (row, n) in enumerate(zip(rows, lengths)):
        out[i] = np.interp(new_scale, scales[int(n)], row[:n])
    return out


def make_dataset(args) -> dict[str, np.ndarray]:
    """`mnist1d.data.make_dataset(args)`'s `x`, `y`, `x_test` and `y_test`, the same values."""
    templates = get_templates()
    set_seed(args.seed)
    per_class = args.num_samples // len(templates["y"])
    labels = np.repeat(np.arange(len(templates["y"])), per_class)
    ys = templates["y"][labels]
    low, high = args.padding
    length = args.template_len + high  # every sample's length after the first interpolation
    draws = _draws(args, len(labels), length)

    # pad: each template (plus eps) followed by its own number of zeros, then dilated to `length` points
    pads = low + (draws["pad"] * (high - low + 1)).astype(int)
    template = templates["x"][labels] + 1e-8
    padded = np.zeros((len(labels), template.shape[1] + high))
    padded[:, : template.shape[1]] = template
    x = _interpolate_rows(padded, template.shape[1] + pads, length)
    x *= (1 + args.scale_coeff * (draws["scale"] - 0.5))[:, None]
    # translate: np.concatenate([x[-k:], x[:-k]]) is a roll by k, except that k = 0 and k >= length (a
    # `max_translation` over the padded length) leave x as it is
    shift = np.where(draws["shift"] < length, draws["shift"], 0)
    columns = (np.arange(length)[None, :] - shift[:, None]) % length
    x = np.take_along_axis(x, columns, axis=1)
    mask = x != 0
    x = mask * x + (1 - mask) * gaussian_filter1d(draws["corr"], 2, axis=1)
    x = x + draws["iid"]
    coeff = args.shear_scale * (draws["shear"] - 0.5)
    x = x - coeff[:, None] * np.linspace(-0.5, 0.5, length)[None, :]
    xs = _interpolate_rows(x, np.full(len(x), length), args.final_seq_length)

    shuffle = np.random.permutation(len(ys))
    xs, ys = xs[shuffle], ys[shuffle]
    if args.shuffle_seq:
        xs = xs[..., np.random.permutation(args.final_seq_length)]
    xs = (xs - xs.mean()) / xs.std()
    split = int(len(ys) * args.train_split)
    return {"x": xs[:split], "x_test": xs[split:], "y": ys[:split], "y_test": ys[split:]}
