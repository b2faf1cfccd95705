"""The one reader of nxm-deploy's YAML configuration files (recipes, engine specs): the file checks, and every problem
as one :class:`~nxm_deploy.errors.ConfigError` line in one format (what, which file, the rule, a hint).

Torch-free (the client and the engine builder read configuration through it).
"""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import BaseModel, ValidationError

from nxm_deploy.errors import ConfigError, NxmError


def read_yaml_mapping(path: str | Path, what: str, *, missing_hint: str | None = None) -> dict:
    """The mapping a YAML configuration file holds (not validated yet).

    Args:
        path: the file. what: its kind in messages (``"Recipe"``, ``"Engine spec"``). missing_hint: the hint when
            the file does not exist.

    Raises:
        ConfigError: missing file, not UTF-8, not YAML, or not a mapping at the top level (one line each).
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} file {path} not found.", hint=missing_hint)
    from nxm_deploy.fileio import check_utf8

    check_utf8(path, f"{what} file", error=ConfigError)  # configuration, not task data
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{what} {path} is not valid YAML: {exc}".replace("\n", " ")) from None
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {path}: the top level must be a mapping of keys, got {type(data).__name__}.")
    return data


def format_validation_error(source: str, exc: ValidationError) -> tuple[str, str | None]:
    """``(message, hint)`` of a pydantic error: every bad key on one line (``unknown key 'a.b'``; ``'a.b': rule (got
    value)``), the hints of our own errors raised inside validators joined."""
    lines, hints = [], []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "<root>"
        cause = (err.get("ctx") or {}).get("error")
        if err["type"] == "extra_forbidden":
            lines.append(f"unknown key '{loc}'")
        elif isinstance(cause, NxmError):
            lines.append(f"'{loc}': {cause.message}")
            if cause.hint:
                hints.append(cause.hint)
        else:
            got = f" (got {err.get('input')!r})" if err["loc"] else ""  # not the whole file
            lines.append(f"'{loc}': {err['msg']}{got}".replace("\n", " "))
    return f"{source}: " + "; ".join(lines), "; ".join(hints) or None


def validate_mapping(model: type[BaseModel], data, source: str, *, hint: str | None = None):
    """``model.model_validate(data)``, every problem as one :class:`ConfigError` (:func:`format_validation_error`).

    Args:
        source: the file (and overrides) in messages, e.g. ``"Recipe recipes/x.yaml"``. hint: the hint when the
            errors carry none.

    Raises:
        ConfigError: ``data`` is not a mapping, or a key is unknown or has a bad value.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of keys, got {type(data).__name__}.")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        message, own_hint = format_validation_error(source, exc)
        raise ConfigError(message, hint=own_hint or hint) from None
