"""Hydra composition for the CLI: recipes, config groups and overrides -> validated, typed configs.

Hydra's compose API is used instead of `@hydra.main` so that one console script serves several commands and
every composition error becomes a one-paragraph `UserError` (exit status 2) instead of a traceback. The schema of
`conf/train.yaml` is `TrainConfig` (registered in Hydra's ConfigStore), so the group YAMLs state only what differs
from its defaults; every installed plugin is registered in the ConfigStore from its `Config` dataclass. Composing
does no I/O beyond reading the configs: `init_from` is resolved by `lit_open.train.run`.
"""

from __future__ import annotations

import dataclasses
import re
from importlib.metadata import entry_points
from importlib.resources import files
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_module
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException, MissingConfigException
from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from lit_open.config import (
    COMMAND_SCHEMAS,
    LAUNCH_KEYS,
    TrainConfig,
    run_record,
    validate,
)
from lit_open.errors import UserError, check_choice
from lit_open.model.config import NON_ARCHITECTURE_KEYS
from lit_open.typed import describe_omegaconf_error, schema_keys, to_typed

CONFIG_MODULE = "lit_open.conf"
PLUGIN_ENTRY_POINT_GROUP = "lit_open.plugins"
PRIMARY = "train"
SCHEMA = "train_schema"  # the ConfigStore name of TrainConfig, the first entry of conf/train.yaml's defaults
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
# Groups whose choice is the `name` of what they configure: `schedule=wsd` sets schedule.name=wsd, and
# `schedule.name=wsd` on the command line means `schedule=wsd`, so the two can never disagree.
NAMED_GROUPS = ("optim", "schedule", "strategy")
LISTABLE = {"recipe": "recipes", "model": "models", "plugins": "plugins"}  # group -> `lit-open list` topic
SAVED_RUN = "saved_run"  # the recipe name under which `--config RUN/config.yaml` is composed
_COULD_NOT_OVERRIDE = re.compile(r"Could not override '([^']+)'")


def plugin_entry_points() -> dict[str, str]:
    """Installed plugins (entry-point group `lit_open.plugins`): name -> import path of the class."""
    return {ep.name: ep.value.replace(":", ".") for ep in entry_points(group=PLUGIN_ENTRY_POINT_GROUP)}


def plugin_class(target: str) -> type | None:
    """The class a plugin's `_target_` names, or None when it does not import (build_plugins then says why)."""
    try:
        return get_class(target)
    except Exception:  # a broken third-party plugin: composing still works, and starting the run names the error
        return None


def plugin_defaults(target: str) -> dict[str, Any]:
    """A plugin's options and their defaults, from its `Config` dataclass (MISSING ones as '???')."""
    cls = plugin_class(target)
    config = getattr(cls, "Config", None)
    if not dataclasses.is_dataclass(config):
        return {}
    return OmegaConf.to_container(OmegaConf.structured(config))  # from the class: its __post_init__ does not run


def conf_dir() -> Path:
    return Path(str(files(CONFIG_MODULE)))


def group_options(group: str) -> list[str]:
    """Names selectable in a config group (YAML files; installed plugins for `plugins`)."""
    if group == "plugins":
        return sorted(plugin_entry_points())
    return sorted(p.stem for p in (conf_dir() / group).glob("*.yaml"))


def describe_group_entry(group: str, name: str) -> str:
    """The first `# ` comment line of a group's YAML file (after a `# @package` line), used by `lit-open list`."""
    path = conf_dir() / group / f"{name}.yaml"
    if not path.exists():
        return ""
    for line in path.read_text().splitlines():
        if line.startswith("# ") and not line.startswith("# @package"):
            return line[2:].strip()
    return ""


def _register(plugins: dict[str, dict[str, Any]], saved_run: dict[str, Any] | None = None) -> None:
    store = ConfigStore.instance()
    store.store(name=SCHEMA, node=TrainConfig)
    for name, options in plugins.items():
        store.store(group="plugins", name=name, node={name: options})
    for name, schema in COMMAND_SCHEMAS.items():
        store.store(name=name, node=schema)
    if saved_run is not None:
        store.store(group="recipe", name=SAVED_RUN, node=saved_run, package="_global_")


def _compose(overrides: list[str], name: str, plugins: dict[str, dict[str, Any]], saved_run: dict | None) -> Any:
    GlobalHydra.instance().clear()
    _register(plugins, saved_run)
    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        return compose(config_name=name, overrides=overrides, return_hydra_config=True)


def _compose_or_explain(
    overrides: list[str], name: str, schema: type, plugins: dict[str, dict[str, Any]], saved_run: dict | None = None
) -> Any:
    try:
        cfg = _compose(list(overrides), name, plugins, saved_run)
    except MissingConfigException as err:
        raise UserError(_missing_config_message(err)) from None
    except (HydraException, OmegaConfBaseException) as err:
        raise UserError(_override_message(err, schema, plugins)) from None
    except AssertionError as err:  # OmegaConf asserts when an override sets a key inside a null node
        raise UserError(_null_parent_message(overrides) or f"Bad override: {err}") from None
    finally:
        GlobalHydra.instance().clear()
    with open_dict(cfg):
        choices = dict(cfg.hydra.runtime.choices)
        del cfg["hydra"]
    return cfg, choices


def load_train_config(overrides: list[str], config_file: str | Path | None = None) -> TrainConfig:
    """Compose the primary config with overrides, and validate it.

    config_file: a run's saved config.yaml, which then stands in for the recipe (`saved_run_recipe`): the same
    overrides work on it as on a recipe.
    """
    plugins = {name: {"_target_": t, **plugin_defaults(t)} for name, t in plugin_entry_points().items()}
    overrides = _normalize(list(overrides), plugins)
    saved_run = None
    if config_file is not None:
        saved_run = saved_run_recipe(Path(config_file), overrides)
        overrides = [*overrides, f"recipe={SAVED_RUN}"]
    cfg, choices = _compose_or_explain(overrides, PRIMARY, TrainConfig, plugins, saved_run)
    with open_dict(cfg):
        if choices.get("recipe") and choices["recipe"] != SAVED_RUN:
            cfg.run.recipe = choices["recipe"]
        for group in NAMED_GROUPS:
            if choices.get(group):
                _check_name(cfg, group, choices[group])
                cfg[group].name = choices[group]
        # a recipe's options for a plugin the user deselected (plugins=[...]) stay behind without a _target_
        for name in [n for n, spec in (cfg.get("plugins") or {}).items() if "_target_" not in spec]:
            del cfg.plugins[name]
    return validate(cfg)


def saved_run_recipe(config_file: Path, overrides: list[str]) -> dict[str, Any]:
    """A run's saved config.yaml as a recipe: its group choices (named groups, plugins) in a defaults list, its values
    on top. A group chosen on the command line (`strategy=fsdp`, `model=NAME`, `plugins=[...]`) replaces the saved
    block of that group, as a choice replaces a group's preset; the launch options (resume, ...) are not taken."""
    if not config_file.is_file():
        raise UserError(f"--config {config_file}: no such file. Give the config.yaml of a run directory.")
    try:
        saved = OmegaConf.to_container(OmegaConf.load(config_file), resolve=False)
    except Exception as err:  # any YAML or reading error: the file is not a saved run config
        raise UserError(f"--config {config_file} cannot be read as YAML ({type(err).__name__}: {err}).") from err
    if not isinstance(saved, dict) or not isinstance(saved.get("model"), dict):
        raise UserError(f"--config {config_file} is not a lit-open run config (no model block): give RUN/config.yaml.")
    chosen = {o.split("=", 1)[0] for o in overrides if "=" in o and not o.startswith(("+", "~"))}
    if "recipe" in chosen:
        raise UserError(
            "--config and recipe= both say where the run's settings come from: give one of them (--config "
            "RUN/config.yaml continues or reruns that run; recipe=NAME starts from a recipe)."
        )
    saved_plugins = saved.get("plugins") or {}
    node = {key: value for key, value in saved.items() if key not in chosen and key not in LAUNCH_KEYS}
    # the plugins' _target_ comes from the group entries the defaults list selects; a deselected plugin's options
    # then stay behind without one and are dropped (load_train_config)
    node["plugins"] = {name: {k: v for k, v in spec.items() if k != "_target_"} for name, spec in saved_plugins.items()}
    defaults: list[Any] = [{f"override /{g}": saved[g]["name"]} for g in NAMED_GROUPS if isinstance(saved.get(g), dict)]
    defaults.append({"override /plugins": list(saved_plugins)})
    return {"defaults": [*defaults, "_self_"], **node}


def load_command_config(command: str, overrides: list[str]) -> Any:
    """The typed config of a command other than train (`COMMAND_SCHEMAS`: prepare, eval, convert, report) from
    its `key=value` overrides: Hydra's grammar, as for train (lists as `[a,b]`, `null`, quoting)."""
    schema = COMMAND_SCHEMAS[command]
    options = _leaf_keys(schema)
    for override in overrides:
        key, sep, _ = override.lstrip("+").partition("=")
        if not sep or key not in options:
            unknown = f"Unknown config key '{key}' of " if sep else ""
            raise UserError(
                f"{unknown}lit-open {command}: {override!r} is not an option. Give key=value with one of: "
                f"{', '.join(options)} (`lit-open --help`)."
            )
    cfg, _ = _compose_or_explain(list(overrides), command, schema, {})
    missing = [key for key in options if _is_missing(cfg, key)]
    if missing:
        raise UserError(f"lit-open {command} needs {missing[0]}=... (see `lit-open --help`).")
    return to_typed(schema, cfg, command)


def _is_missing(cfg: DictConfig, dotted: str) -> bool:
    parent, _, leaf = dotted.rpartition(".")
    return OmegaConf.is_missing(OmegaConf.select(cfg, parent) if parent else cfg, leaf)


def _leaf_keys(schema: type, prefix: str = "") -> list[str]:
    """The dotted keys of a dataclass's fields, nested dataclasses expanded (e.g. run.dir)."""
    keys = []
    for f in dataclasses.fields(schema):
        nested = dataclasses.is_dataclass(f.default_factory) if f.default_factory is not dataclasses.MISSING else False
        keys += _leaf_keys(f.default_factory, f"{prefix}{f.name}.") if nested else [prefix + f.name]
    return keys


def explicit_model_keys(overrides: list[str]) -> frozenset[str]:
    """The model keys given on the command line (`model` itself for `model=PRESET`), and the stage keys
    (NON_ARCHITECTURE_KEYS, e.g. a long-context stage's rope_theta and max_seq_len) that the chosen recipe's own
    body sets: with init_from, these must agree with the source's architecture or, for stage keys, replace the
    source's values, while the others are taken from the source."""
    keys = {o.lstrip("+~").split("=", 1)[0] for o in overrides}
    explicit = {k for k in keys if k == "model" or k.startswith("model.")}
    recipe = next((o.split("=", 1)[1] for o in overrides if o.split("=", 1)[0] == "recipe"), None)
    if recipe is not None:
        explicit |= {f"model.{k}" for k in recipe_stage_keys(recipe)}
    return frozenset(explicit)


def recipe_stage_keys(recipe: str) -> list[str]:
    """The NON_ARCHITECTURE_KEYS under `model:` in the recipe file itself (not in what its defaults bring)."""
    path = files(CONFIG_MODULE) / "recipe" / f"{recipe}.yaml"
    if not path.is_file():
        return []
    body = OmegaConf.load(str(path)).get("model") or {}
    return [key for key in body if key in NON_ARCHITECTURE_KEYS]


def _normalize(overrides: list[str], plugins: dict[str, dict[str, Any]]) -> list[str]:
    """`GROUP.name=X` -> `GROUP=X` for NAMED_GROUPS, and `+KEY=v` -> `KEY=v` for a key the schema (or the plugin's
    Config) has: every such key exists in the composed config, where the `+` was once needed for keys a preset or a
    plugin's YAML did not list. A plugin added twice, and `++` on a group, are refused with what to write."""
    chosen = {o.split("=", 1)[0]: o.split("=", 1)[1] for o in overrides if "=" in o and not o.startswith(("+", "~"))}
    added = [o.partition("=")[2] for o in overrides if o.startswith("+plugins=")]
    for name in {n for n in added if added.count(n) > 1}:
        raise UserError(
            f"Plugin '{name}' is selected twice (+plugins={name} twice). List each plugin once: plugins=[a,b] "
            "replaces the recipe's plugins, +plugins=c adds one."
        )
    if added and "plugins" in chosen:  # Hydra would apply the list and drop the additions without a word
        whole = ",".join(dict.fromkeys([*_listed(chosen["plugins"]), *added]))
        raise UserError(
            f"plugins={chosen['plugins']} replaces the recipe's plugins and +plugins={added[0]} adds to them: give "
            f"one list with every plugin once, plugins=[{whole}]."
        )
    normalized = []
    for override in overrides:
        key, _, value = override.partition("=")
        group = key.removesuffix(".name")
        if key.startswith("++") and key[2:] in GROUP_NAMES:
            how = "(plugins=[a,b] replaces the selection), or +plugins=NAME to add one" if key[2:] == "plugins" else ""
            raise UserError(
                f"{override!r}: '++' does not apply to a config group. Write {key[2:]}={value} to choose {how}."
            )
        if group in NAMED_GROUPS and key == f"{group}.name":
            check_choice(key, value, tuple(group_options(group)))
            if group in chosen and chosen[group] != value:
                raise UserError(
                    f"{group}={chosen[group]} and {key}={value} disagree: the {group} group's choice is its name. "
                    f"Give one of them ({group}={value} selects the {GROUP_NAMES[group]} {value})."
                )
            override = f"{group}={value}"
        if key.startswith("+") and not key.startswith("++") and _declared(key[1:], plugins):
            override = override[1:]
        normalized.append(override)
    return normalized


def _listed(value: str | None) -> list[str]:
    """The names of a `[a,b]` (or single-name) group value on the command line."""
    return [v.strip() for v in (value or "").strip("[]").split(",") if v.strip()]


def _declared(key: str, plugins: dict[str, dict[str, Any]]) -> bool:
    parts = key.split(".")
    if parts[0] == "plugins":
        return len(parts) == 3 and parts[2] in plugins.get(parts[1], {})
    parent, _, leaf = key.rpartition(".")
    return leaf in (schema_keys(TrainConfig, parent) or [])


def _check_name(cfg: DictConfig, group: str, choice: str) -> None:
    """A recipe (or a config) that sets GROUP.name instead of choosing the group would mix two configurations."""
    name = cfg[group].get("name")
    default = getattr(schema_default(group), "name", None)
    if name not in (choice, default):
        raise UserError(
            f"{group}.name={name} is set by the recipe or config, but the {group} group's choice is {choice}: a "
            f"recipe chooses it in its defaults list (`- override /{group}: {name}`), a command line with "
            f"{group}={name}."
        )


def schema_default(group: str) -> Any:
    """The default instance of a TrainConfig field (e.g. ScheduleConfig() for 'schedule')."""
    field = next(f for f in dataclasses.fields(TrainConfig) if f.name == group)
    return field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default


def _missing_config_message(err: MissingConfigException) -> str:
    group, _, name = (err.missing_cfg_file or "").rpartition("/")
    if group not in GROUP_NAMES:
        return str(err).strip().splitlines()[0]
    options = err.options or group_options(group)
    hint = f" See `lit-open list {LISTABLE[group]}`." if group in LISTABLE else ""
    available = ", ".join(options) or "none installed"
    return f"Unknown {GROUP_NAMES[group]} '{name}' ({group}={name}). Available: {available}.{hint}"


def _override_message(err: Exception, schema: type, plugins: dict[str, dict[str, Any]]) -> str:
    text = str(err).strip()
    if text.startswith("Error merging override") and isinstance(err.__cause__, OmegaConfBaseException):
        return describe_omegaconf_error(err.__cause__, schema, "config")  # a bad value, caught by the typed schema
    match = _COULD_NOT_OVERRIDE.search(text)
    if match and match.group(1).startswith("plugins.") and match.group(1).count(".") >= 2:
        return _plugin_option_message(match.group(1), plugins)
    if match:
        key = match.group(1)
        parent = key.rsplit(".", 1)[0] if "." in key else ""
        if key.rsplit(".", 1)[-1] in _keys_under(schema, parent):
            if isinstance(err.__cause__, OmegaConfBaseException):  # the key exists; its value does not fit
                return describe_omegaconf_error(err.__cause__, schema, "config")
            return (
                f"'{key}' is a valid key that this config does not set (its preset or recipe leaves it at the "
                f"default): set it with a '+', +{key}=..."
            )
        where = f"under '{parent}'" if parent else "at the top level"
        return f"Unknown config key '{key}'. Keys {where}: {', '.join(_keys_under(schema, parent)) or 'none'}."
    return "Bad override: " + " ".join(line.strip() for line in text.splitlines() if line.strip())


def _null_parent_message(overrides: list[str]) -> str | None:
    """Why `a.b.c=v` failed when `a.b` is an optional section this config leaves null (e.g. logger.wandb)."""
    for override in overrides:
        key = override.partition("=")[0].lstrip("+~")
        parts = key.split(".")
        if len(parts) < 3 or not schema_keys(TrainConfig, ".".join(parts[:-1])):
            continue
        parent = ".".join(parts[:-1])
        preset = f"{parts[0]}={parts[1]}" if parts[1] in group_options(parts[0]) else f"{parent}={{...}}"
        return (
            f"'{key}' sets a key of '{parent}', which this config leaves null (off). Turn it on first with "
            f"{preset}, then {override} applies."
        )
    return None


def _plugin_option_message(key: str, plugins: dict[str, dict[str, Any]]) -> str:
    """Why `plugins.NAME.OPTION=...` matched nothing: an unknown plugin or option, or a plugin not selected."""
    _, name, option = key.split(".", 2)
    if name not in plugins:
        return f"Unknown plugin '{name}' in '{key}'. Installed plugins: {', '.join(sorted(plugins)) or 'none'}."
    options = [o for o in plugins[name] if o != "_target_"]
    if option.split(".")[0] not in options:
        return (
            f"Unknown option '{option}' of plugin '{name}' ({key}). Its options: {', '.join(options) or 'none'} "
            "(`lit-open list plugins` shows them with their defaults and help)."
        )
    return (
        f"'{key}' sets an option of plugin '{name}', which this run does not select. Select it with "
        f"+plugins={name} (one more than the recipe's) or list it in plugins=[...]."
    )


def _keys_under(schema: type, dotted: str) -> list[str]:
    return schema_keys(schema, dotted) or []


def to_yaml(cfg: TrainConfig) -> str:
    """The run's config.yaml: `run_record(cfg)`, the config less the launch options."""
    return OmegaConf.to_yaml(OmegaConf.create(run_record(cfg)))
