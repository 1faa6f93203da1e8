"""Hydra composition for the CLI: recipes, config groups and overrides -> a validated `TrainConfig`.

Hydra's compose API is used instead of `@hydra.main` so that one console script serves several commands and
every composition error becomes a one-paragraph `UserError` (exit status 2) instead of a traceback.
"""

from __future__ import annotations

import dataclasses
import re
from importlib.metadata import entry_points
from importlib.resources import files
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir, initialize_config_module
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException, MissingConfigException
from hydra.utils import get_class
from omegaconf import OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from lit_open.config import PrepareConfig, TrainConfig, schema_keys, to_typed, validate
from lit_open.errors import UserError

CONFIG_MODULE = "lit_open.conf"
PLUGIN_ENTRY_POINT_GROUP = "lit_open.plugins"
PRIMARY = "train"
GROUP_NAMES = {
    "recipe": "recipe",
    "model": "model preset",
    "data": "data preset",
    "optim": "optimizer",
    "schedule": "LR schedule",
    "strategy": "strategy",
    "trainer": "trainer preset",
    "logger": "logger preset",
    "plugins": "plugin",
}


def plugin_entry_points() -> dict[str, str]:
    """Installed plugins (entry-point group `lit_open.plugins`): name -> import path of the class."""
    return {ep.name: ep.value.replace(":", ".") for ep in entry_points(group=PLUGIN_ENTRY_POINT_GROUP)}


def conf_dir() -> Path:
    return Path(str(files(CONFIG_MODULE)))


def group_options(group: str) -> list[str]:
    """Names selectable in a config group (YAML files, plus installed plugins for `plugins`)."""
    names = {p.stem for p in (conf_dir() / group).glob("*.yaml")}
    if group == "plugins":
        names |= set(plugin_entry_points())
    return sorted(names)


def describe_group_entry(group: str, name: str) -> str:
    """The first `# ` comment line of a group's YAML file (after a `# @package` line), used by `lit-open list`."""
    path = conf_dir() / group / f"{name}.yaml"
    if not path.exists():
        return ""
    for line in path.read_text().splitlines():
        if line.startswith("# ") and not line.startswith("# @package"):
            return line[2:].strip()
    return ""


def _register_entry_point_plugins() -> None:
    """Make every installed plugin selectable as `plugins=[name]`, even without a YAML of its own."""
    store = ConfigStore.instance()
    shipped = {p.stem for p in (conf_dir() / "plugins").glob("*.yaml")}
    for name, target in plugin_entry_points().items():
        if name not in shipped:
            store.store(group="plugins", name=name, node={name: {"_target_": target}})


def _compose(overrides: list[str], config_file: Path | None, name: str = PRIMARY) -> Any:
    GlobalHydra.instance().clear()
    _register_entry_point_plugins()
    ConfigStore.instance().store(name="prepare", node=PrepareConfig)
    if config_file is None:
        context = initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3")
    else:
        if not config_file.is_file():
            raise UserError(f"--config {config_file}: no such file. Give the config.yaml of a run directory.")
        context = initialize_config_dir(config_dir=str(config_file.resolve().parent), version_base="1.3")
        name = config_file.stem
    with context:
        return compose(config_name=name, overrides=overrides, return_hydra_config=True)


def _compose_or_explain(overrides: list[str], config_file: Path | None, name: str, schema: type) -> Any:
    try:
        return _compose(list(overrides), config_file, name)
    except MissingConfigException as err:
        raise UserError(_missing_config_message(err)) from None
    except (HydraException, OmegaConfBaseException) as err:
        raise UserError(_override_message(err, schema)) from None
    finally:
        GlobalHydra.instance().clear()


def load_train_config(overrides: list[str], config_file: str | Path | None = None) -> TrainConfig:
    """Compose the primary config (or a run's saved config.yaml) with overrides, and validate it."""
    cfg = _compose_or_explain(overrides, Path(config_file) if config_file else None, PRIMARY, TrainConfig)
    recipe = cfg.hydra.runtime.choices.get("recipe")
    with open_dict(cfg):
        del cfg["hydra"]
        if recipe:
            cfg.run.recipe = recipe
        # a recipe's options for a plugin the user deselected (plugins=[...]) stay behind without a _target_
        for name in [n for n, spec in (cfg.get("plugins") or {}).items() if "_target_" not in spec]:
            del cfg.plugins[name]
    typed = validate(cfg)
    if typed.init_from:
        from lit_open.checkpoint.source import apply_init_source

        explicit = {o.lstrip("+~").split("=", 1)[0] for o in overrides}
        typed = apply_init_source(typed, {k for k in explicit if k == "model" or k.startswith("model.")})
    return typed


LISTABLE = {"recipe": "recipes", "model": "models", "plugins": "plugins"}  # group -> `lit-open list` topic


def _missing_config_message(err: MissingConfigException) -> str:
    group, _, name = (err.missing_cfg_file or "").rpartition("/")
    if group not in GROUP_NAMES:
        return str(err).strip().splitlines()[0]
    options = err.options or group_options(group)
    hint = f" See `lit-open list {LISTABLE[group]}`." if group in LISTABLE else ""
    available = ", ".join(options) or "none installed"
    return f"Unknown {GROUP_NAMES[group]} '{name}' ({group}={name}). Available: {available}.{hint}"


_COULD_NOT_OVERRIDE = re.compile(r"Could not override '([^']+)'")


def load_prepare_config(overrides: list[str]) -> PrepareConfig:
    cfg = _compose_or_explain(overrides, None, "prepare", PrepareConfig)
    with open_dict(cfg):
        del cfg["hydra"]
    return to_typed(PrepareConfig, cfg, "prepare")


def _override_message(err: Exception, schema: type) -> str:
    text = str(err).strip()
    match = _COULD_NOT_OVERRIDE.search(text)
    if match and match.group(1) == "plugins" and not group_options("plugins"):
        # Hydra knows no `plugins` group while no plugin is shipped or installed
        return (
            "No plugins are installed, so plugins=[...] has nothing to select. Packages add plugins under the "
            "entry-point group lit_open.plugins; `lit-open list plugins` shows what is available."
        )
    if match and match.group(1).startswith("plugins.") and match.group(1).count(".") >= 2:
        return _plugin_option_message(match.group(1))
    if match:
        key = match.group(1)
        parent = key.rsplit(".", 1)[0] if "." in key else ""
        if key.rsplit(".", 1)[-1] in _keys_under(schema, parent):
            return (
                f"'{key}' is a valid key that this config does not set (its preset or recipe leaves it at the "
                f"default): set it with a '+', +{key}=..."
            )
        where = f"under '{parent}'" if parent else "at the top level"
        hint = " (plugin options that a plugin's YAML does not set are added with '+': +plugins.NAME.option=...)"
        return f"Unknown config key '{key}'. Keys {where}: {', '.join(_keys_under(schema, parent)) or 'none'}." + (
            hint if key.startswith("plugins.") else ""
        )
    return "Bad override: " + " ".join(line.strip() for line in text.splitlines() if line.strip())


def _plugin_option_message(key: str) -> str:
    """Why `plugins.NAME.OPTION=...` matched nothing: an unknown plugin or option, or a plugin not selected."""
    _, name, option = key.split(".", 2)
    installed = plugin_entry_points()
    if name not in installed:
        return f"Unknown plugin '{name}' in '{key}'. Installed plugins: {', '.join(sorted(installed)) or 'none'}."
    try:
        plugin_class = get_class(installed[name])
        options = [f.name for f in dataclasses.fields(plugin_class.Config)]
    except Exception:  # a broken third-party plugin: the message still names the key
        options = []
    if option.split(".")[0] not in options:
        return (
            f"Unknown option '{option}' of plugin '{name}' ({key}). Its options: {', '.join(options) or 'none'} "
            f"(`lit-open list plugins`; the plugin's docstring describes them)."
        )
    return (
        f"'{key}' sets an option of plugin '{name}', which this run does not select. Select it with "
        f"+plugins={name} (one more than the recipe's) or list it in plugins=[...]; an option its YAML does not set "
        f"is added with '+': +{key}=..."
    )


def _keys_under(schema: type, dotted: str) -> list[str]:
    return schema_keys(schema, dotted) or []


def to_yaml(cfg: TrainConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
