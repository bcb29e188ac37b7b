"""Where this library keeps its on-disk caches (kept apart from `data` so that reading a cache path does not
import `datasets`)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """Root of every on-disk cache of this library: `$WEIGHTFORMER_HF_CACHE` or `~/.cache/weightformer_hf`."""
    return Path(os.environ.get("WEIGHTFORMER_HF_CACHE", Path.home() / ".cache" / "weightformer_hf"))
