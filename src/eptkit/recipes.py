"""Recipes: JSON or TOML files whose keys are `eptkit train` option names (recipes/README.md)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

DOC_KEYS = ("description", "source", "comment")


def read_options_file(path: Path, what: str) -> Any:
    """The parsed content of a JSON or TOML file (by suffix); a missing or unparsable file is a
    ValueError naming the file and `what` it should be."""
    if not path.is_file():
        raise ValueError(f"{path}: {what} file not found")
    try:
        if path.suffix == ".toml":
            import tomllib

            return tomllib.loads(path.read_text(encoding="utf-8"))
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot parse the {what} ({str(e).splitlines()[0]})") from None


def read_recipe(path, valid_keys: set[str]) -> dict[str, Any]:
    """Option name (underscores) -> value. Keys may be written `prompt-length`, `prompt_length` or
    `--prompt-length`; `no-fusion: true` means fusion false; documentation keys and `_`-prefixed keys
    are skipped. A missing or unparsable file or an unknown key is a ValueError naming the file."""
    path = Path(path)
    data = read_options_file(path, "recipe")
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a recipe must be an object of option names and values")
    out = {}
    for key, value in data.items():
        if key.startswith("_") or key in DOC_KEYS:
            continue  # documentation keys
        name = key.lstrip("-").replace("-", "_")
        if name == "no_fusion":
            name, value = "fusion", not value
        if name not in valid_keys:
            raise ValueError(f"{path}: unknown option {key!r} in recipe")
        out[name] = value
    return out
