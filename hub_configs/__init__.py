"""Training presets (JSON), shipped as package data so `--config <preset name>` works from a wheel."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path


def preset_names() -> list[str]:
    return sorted(p.name[: -len(".json")] for p in resources.files(__name__).iterdir() if p.name.endswith(".json"))


def load_preset(name_or_path: str) -> dict:
    """A preset by name (`mnist1d-mlp`) or by path to a JSON file (a JSON object)."""
    from weightformer_hf.errors import WeightFormerError

    path = Path(name_or_path)
    if path.suffix == ".json" and path.exists():
        text = path.read_text()
    else:
        resource = resources.files(__name__) / f"{name_or_path}.json"
        if not resource.is_file():
            raise FileNotFoundError(
                f"no preset {name_or_path!r}: give a JSON file path or one of {', '.join(preset_names())}"
            )
        text = resource.read_text()
    try:
        preset = json.loads(text)
    except json.JSONDecodeError as err:
        raise WeightFormerError(f"preset {name_or_path!r} is not valid JSON: {err}") from None
    if not isinstance(preset, dict):
        kind = type(preset).__name__
        raise WeightFormerError(f"preset {name_or_path!r} must be a JSON object of settings, not a {kind}")
    return preset
