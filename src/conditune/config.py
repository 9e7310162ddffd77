"""One config mechanism: a YAML file plus dotted command-line overrides, into typed dataclasses.

Every recipe (``conditune train``, ``demo``, ``experiment``, ``data synth``) describes its settings as a
dataclass whose fields are sections (themselves dataclasses). :func:`load_config` reads the YAML file,
merges ``section.key=value`` overrides (values parsed as YAML: ``1e-4``, ``[0, 1]``, ``null``), checks
every key and type against the dataclass with OmegaConf's structured configs, builds the dataclass and
runs its ``validate()``. Every problem is one :class:`~conditune.errors.CondituneError` line that names
the key (``training.max_steps: '2.5' is not an integer``).

Keys that were renamed are translated once, here (:data:`RENAMED_KEYS` of the dataclass), so a config
written for an earlier release still loads; each translated key is reported once on stderr.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

from conditune.errors import CondituneError

T = TypeVar("T")
log = logging.getLogger("conditune")


# ---------------------------------------------------------------------------------------------- reading


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """A YAML file holding a mapping; a missing, unreadable, binary or non-mapping file is one error line."""
    from conditune.io import read_text_file

    path = Path(path)
    text = read_text_file(path, what="config file")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise CondituneError(f"{path}: not valid YAML ({' '.join(str(exc).split())})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise CondituneError(f"{path}: expected a mapping of sections, got {type(data).__name__}")
    return data


def parse_overrides(items: Sequence[str] | Mapping[str, Any]) -> dict[str, Any]:
    """``["training.lr=1e-4", ...]`` -> ``{"training.lr": 0.0001}``; values are parsed as YAML."""
    if isinstance(items, Mapping):
        return dict(items)
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep:
            raise CondituneError(f"override {item!r} is not of the form section.key=value")
        if not key:
            raise CondituneError(f"override {item!r} has an empty key")
        try:
            out[key] = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            out[key] = raw
    return out


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    """``data["a"]["b"]["c"] = value`` for ``key = "a.b.c"``, creating sections on the way."""
    node = data
    *parents, last = key.split(".")
    for part in parents:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise CondituneError(f"override {key}: {part} is not a section")
        node = child
    node[last] = value


def pop_dotted(data: dict[str, Any], key: str) -> tuple[bool, Any]:
    node = data
    *parents, last = key.split(".")
    for part in parents:
        node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict):
            return False, None
    if last not in node:
        return False, None
    return True, node.pop(last)


def rename_keys(data: dict[str, Any], renamed: Mapping[str, str], where: str) -> dict[str, Any]:
    """Move old keys to their new places (``{"train.lr": "optimizer.lr"}``), saying so once per key."""
    for old, new in renamed.items():
        found, value = pop_dotted(data, old)
        if not found:
            continue
        log.warning("%s: %s is now %s", where, old, new)
        set_dotted(data, new, value)
    for section in {old.split(".")[0] for old in renamed}:  # an old section left empty by the moves
        if data.get(section) == {}:
            del data[section]
    return data


# ---------------------------------------------------------------------------------------------- building


def load_config(
    schema: type[T],
    source: str | os.PathLike | Mapping[str, Any] | Any | None = None,
    overrides: Sequence[str] | Mapping[str, Any] = (),
    *,
    ignore_sections: Sequence[str] = (),
    validate: bool = True,
) -> T:
    """``schema`` built from a YAML file (or a mapping, or a config dataclass) and overrides, checked, validated.

    ``ignore_sections``: top-level sections that belong to another recipe sharing the file (the demo's
    ``demo:`` section when ``conditune train`` reads the demo's recipe) and are dropped silently.
    """
    if source is None:
        data: dict[str, Any] = {}
        where = "config"
    elif isinstance(source, Mapping) or (dataclasses.is_dataclass(source) and not isinstance(source, type)):
        data = _plain(source)
        where = "config"
    else:
        data = read_yaml(source)
        where = str(source)
    for key, value in parse_overrides(overrides).items():
        set_dotted(data, key, value)
    for section in ignore_sections:
        data.pop(section, None)
    data = rename_keys(data, getattr(schema, "RENAMED_KEYS", {}), where)
    config = build(schema, data, where)
    if validate and hasattr(config, "validate"):
        config.validate()
    return config


def build(schema: type[T], data: Mapping[str, Any], where: str = "config") -> T:
    """The dataclass ``schema`` from ``data``, every key and value type checked (one error line naming the key)."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), OmegaConf.create(_plain(data)))
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        raise CondituneError(_describe(exc, where)) from None


def _describe(exc, where: str) -> str:
    from omegaconf.errors import ConfigKeyError, ValidationError

    key = getattr(exc, "full_key", None) or ""
    message = str(getattr(exc, "msg", None) or exc).splitlines()[0].strip()
    if isinstance(exc, ConfigKeyError):
        hint = message.split("Did you mean:")[-1].strip(" ?'\"") if "Did you mean" in message else ""
        return f"{where}: unknown key {key}" + (f" (did you mean {hint}?)" if hint else "")
    if isinstance(exc, ValidationError):
        value = getattr(exc, "value", None)
        kind = getattr(exc, "ref_type", None) or ""
        if "could not be converted to Integer" in message:
            return f"{where}: {key} must be an integer, not {value!r}"
        if "could not be converted to Float" in message:
            return f"{where}: {key} must be a number, not {value!r}"
        if "is not a valid bool" in message or "Boolean" in message:
            return f"{where}: {key} must be true or false, not {value!r}"
        return f"{where}: {key or 'value'}: {message}" + (f" ({kind})" if kind and "type" not in message else "")
    return f"{where}: {key + ': ' if key else ''}{message}"


def _plain(value: Any) -> Any:
    """A deep copy made of dicts, lists and scalars (paths as strings), as OmegaConf.create wants."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _plain(dataclasses.asdict(value))
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value


def to_dict(config: Any) -> dict[str, Any]:
    """A config dataclass as plain data (paths as strings), e.g. for JSON or YAML."""
    return _plain(config)


def to_yaml(config: Any) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False, allow_unicode=True)
