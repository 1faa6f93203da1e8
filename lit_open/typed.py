"""Typed configs from OmegaConf: merge a composed config into a dataclass schema, and say what is wrong with it in
the user's words (the key as typed, what would be accepted)."""

from __future__ import annotations

from dataclasses import fields, is_dataclass
from typing import Any, get_args, get_origin, get_type_hints

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, MissingMandatoryValue, OmegaConfBaseException

from lit_open.errors import UserError


def to_typed(schema: type, cfg: DictConfig | dict, what: str, prefix: str = "") -> Any:
    """Merge `cfg` into the dataclass `schema` and return an instance; bad keys and types become UserErrors.

    what: names the config in messages ("config", "eval", "plugin"); prefix: where `cfg` sits in the user's keys
    (e.g. "plugins.gc."), so that a message names the key as it is typed.
    """
    if isinstance(cfg, DictConfig):  # as plain values: a key that a typed node gained with `+` is checked too
        cfg = OmegaConf.to_container(cfg, resolve=False)
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), cfg)
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise UserError(describe_omegaconf_error(err, schema, what, prefix)) from None


def describe_omegaconf_error(err: OmegaConfBaseException, schema: type, what: str, prefix: str = "") -> str:
    relative = getattr(err, "full_key", None) or "?"
    key = prefix + relative
    message = str(err).splitlines()[0]
    if isinstance(err, ConfigKeyError):
        # the dataclass the unknown key was merged into; full_key loses list indices (data.sources[0].x -> x)
        owner = getattr(err, "object_type", None)
        parent = relative.rsplit(".", 1)[0] if "." in relative else ""
        accepted = sorted(f.name for f in fields(owner)) if is_dataclass(owner) else schema_keys(schema, parent)
        return f"Unknown {what} key '{key}'. Accepted keys here: {', '.join(accepted or []) or 'none'}."
    if isinstance(err, MissingMandatoryValue):
        return f"The {what} key '{key}' must be set (it has no default)."
    value = getattr(err, "value", None)
    expected = _field_type(schema, relative)
    if value is not None and expected:
        return f"Bad value for {what} key '{key}': {key}={value!r} must be {_TYPE_PHRASES.get(expected, expected)}."
    got = f" {value!r}" if value is not None else ""
    return f"Bad value{got} for {what} key '{key}': {message}." + (f" Expected {expected}." if expected else "")


_TYPE_PHRASES = {"int": "a whole number (int)", "float": "a number (float)", "bool": "true or false (bool)"}


def _resolve_schema(schema: type, dotted: str) -> Any:
    """The annotated type at `dotted` inside the dataclass `schema` (None when there is no such field)."""
    current: Any = schema
    for part in filter(None, dotted.split(".")):
        if not is_dataclass(current):
            return None
        hints = get_type_hints(current)
        if part not in hints:
            return None
        current = hints[part]
        args = [a for a in get_args(current) if a is not type(None)]
        if args and get_origin(current) is not dict:  # Optional[X] -> X
            current = args[0]
    return current


def schema_keys(schema: type, dotted: str) -> list[str] | None:
    """Field names of the dataclass at `dotted` inside `schema`, or None if it is not a dataclass."""
    node = _resolve_schema(schema, dotted)
    return sorted(f.name for f in fields(node)) if is_dataclass(node) else None


def _field_type(schema: type, dotted: str) -> str | None:
    node = _resolve_schema(schema, dotted)
    return getattr(node, "__name__", None) or (str(node).replace("typing.", "") if node is not None else None)
