"""Typed configuration loaded from YAML with `key.sub=value` overrides.

Every stage has a pydantic model; `load_config` reads a YAML file into it and applies
overrides from the command line (`--set split.test_frac=0.2`) or from the environment
(`RECFB_ETL__SPLIT__TEST_FRAC=0.2`), so any key can be changed without editing files.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from recfb.errors import ConfigError

M = TypeVar("M", bound=BaseModel)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, with errors that name the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def set_dotted(data: dict[str, Any], dotted_key: str, value: Any) -> None:
    """Set `a.b.c` in nested dicts, creating levels as needed."""
    keys = dotted_key.split(".")
    node = data
    for key in keys[:-1]:
        child = node.get(key)
        if not isinstance(child, dict):
            child = {}
            node[key] = child
        node = child
    node[keys[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """`key.sub=value` -> ("key.sub", parsed YAML value)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}': expected KEY=VALUE, e.g. split.test_frac=0.2")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override '{text}': empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key, value


def apply_overrides(data: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    """`data` with each `key.path=value` override set in place (and returned), in order."""
    for key, value in (parse_override(o) for o in overrides or []):
        set_dotted(data, key, value)
    return data


def env_overrides(prefix: str) -> list[tuple[str, Any]]:
    """Overrides from environment variables `PREFIX__A__B=value` -> ("a.b", value)."""
    out = []
    head = prefix.upper() + "__"
    for name, raw in sorted(os.environ.items()):
        if name.startswith(head):
            key = name[len(head) :].lower().replace("__", ".")
            out.append(parse_override(f"{key}={raw}"))
    return out


def build_model(model: type[M], data: dict[str, Any], source: str) -> M:
    """Validate a dict into a config model; the error names the source and the field."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"field '{'.'.join(str(p) for p in err['loc'])}': {err['msg']}" for err in exc.errors()
        )
        raise ConfigError(f"{source}: {problems}") from None


def load_config(
    model: type[M],
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    env_prefix: str | None = None,
) -> M:
    """Load `model` from an optional YAML file, then env overrides, then CLI overrides."""
    data: dict[str, Any] = read_yaml(path) if path else {}
    for key, value in env_overrides(env_prefix) if env_prefix else []:
        set_dotted(data, key, value)
    apply_overrides(data, overrides)
    return build_model(model, data, str(path) if path else model.__name__)
