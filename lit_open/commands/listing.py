"""`lit-open list recipes|models|plugins`: what a run can be composed from; plugins with every option, its default
and its help, read from the plugin's `Config` dataclass (the one place they are stated)."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import torch
from omegaconf import OmegaConf

from lit_open.compose import conf_dir, describe_group_entry, group_options, plugin_class, plugin_entry_points
from lit_open.errors import UserError
from lit_open.model import ModelConfig, Transformer, num_parameters

TOPICS = {"recipes": "recipe", "models": "model", "plugins": "plugins"}


def list_command(args: list[str]) -> None:
    if len(args) != 1 or args[0] not in TOPICS:
        raise UserError("Usage: lit-open list recipes|models|plugins.")
    if args[0] == "plugins":
        print(plugins_listing())
        return
    group = TOPICS[args[0]]
    names = group_options(group)
    if not names:
        print(f"No {args[0]} installed.")
        return
    width = max(map(len, names))
    for name in names:
        size = model_size(name) if group == "model" else ""
        print(f"{name:<{width}}  {size}{describe_group_entry(group, name)}")


def model_size(name: str) -> str:
    config = ModelConfig(**OmegaConf.to_container(OmegaConf.load(conf_dir() / "model" / f"{name}.yaml")))
    with torch.device("meta"):
        params = num_parameters(Transformer(config))
    return f"{params / 1e9:7.2f}B  " if params >= 1e9 else f"{params / 1e6:6.1f}M  "


def plugins_listing() -> str:
    """Every installed plugin: its first docstring line, then `plugins.NAME.OPTION  default  help` per option."""
    installed = plugin_entry_points()
    if not installed:
        return "No plugins installed."
    blocks = []
    for name, target in sorted(installed.items()):
        cls = plugin_class(target)
        if cls is None:
            blocks.append(f"{name}  ({target} does not import)")
            continue
        summary = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        lines = [f"{name}  {summary}"]
        options = option_rows(cls)
        width = max((len(option) for option, _, _ in options), default=0)
        default_width = max((len(default) for _, default, _ in options), default=0)
        lines += [f"    {option:<{width}}  {default:<{default_width}}  {help_}" for option, default, help_ in options]
        blocks.append("\n".join(lines))
    return (
        "\n\n".join(blocks)
        + "\n\nSet an option with plugins.NAME.OPTION=VALUE; docs/plugins/NAME.md explains each plugin."
    )


def option_rows(cls: type) -> list[tuple[str, str, str]]:
    """(option, default as YAML would write it, one-line help) for each field of the plugin's Config."""
    config = getattr(cls, "Config", None)
    if not dataclasses.is_dataclass(config):
        return []
    defaults = OmegaConf.to_container(OmegaConf.structured(config))
    return [(f.name, _yaml_value(defaults[f.name]), f.metadata.get("help", "")) for f in dataclasses.fields(config)]


def _yaml_value(value: Any) -> str:
    """A default as it is written on the command line: null, true, 0.0001, [a, b]."""
    if value is None or isinstance(value, (bool, list, dict)):
        return json.dumps(value)
    return str(value)
