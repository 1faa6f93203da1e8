"""The shape of the code, checked from the source: no import cycles, function-local imports only where they say why,
no module over 500 lines, the Lightning / litdata / lm-eval internals only in lit_open/glue.py."""

from __future__ import annotations

import ast
import dataclasses
import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
# source directory -> the package it ships as (pyproject.toml's package-dir)
PACKAGES = {REPO / "lit_open": "lit_open", REPO / "plugins": "lit_open.plugins"}
MAX_LINES = 500


def modules() -> dict[str, Path]:
    """Every module of lit_open and lit_open.plugins: dotted name -> file."""
    found = {}
    for root, package in PACKAGES.items():
        for path in sorted(root.rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            name = ".".join((package, *parts))
            found[name.removesuffix(".__init__")] = path
    return found


def _type_checking_lines(tree: ast.AST) -> set[int]:
    """Lines inside `if TYPE_CHECKING:` blocks (imports for annotations only, never executed)."""
    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def imports(path: Path, known: dict[str, Path]) -> list[tuple[str, ast.stmt]]:
    """(imported lit_open module, the statement) for every import in the file, module-level or inside functions;
    `from PACKAGE import MODULE` counts as an import of MODULE."""
    tree = ast.parse(path.read_text())
    skip = _type_checking_lines(tree)
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Import, ast.ImportFrom)) or node.lineno in skip:
            continue
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            assert not node.level, f"{path}:{node.lineno}: lit-open imports its modules by their absolute names"
            base = node.module or ""
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        found += [(target, node) for target in targets if target in known]
    return found


def import_graph() -> dict[str, set[str]]:
    known = modules()
    return {name: {target for target, _ in imports(path, known)} - {name} for name, path in known.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first = last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_module_graph_is_found():
    graph = import_graph()
    assert {"lit_open.train.module", "lit_open.plugin", "lit_open.plugins.monitor", "lit_open.glue"} <= set(graph)
    assert "lit_open.plugin" in graph["lit_open.train.module"]
    assert "lit_open.train.runner" in graph["lit_open.train"]  # the lazy `run`: function-local imports count


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_function_local_imports_say_why():
    """A function-local import is only for an optional or slow-to-import dependency, with a comment saying so: on
    its line, on another import line of its block, or on a comment line above in the same function."""
    bare = []
    for path in modules().values():
        lines = path.read_text().splitlines()
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for inner in ast.walk(node):
                if isinstance(inner, (ast.Import, ast.ImportFrom)):
                    before = lines[node.lineno : inner.lineno]  # the function's lines up to the import
                    if not any("#" in line for line in before if line.strip().startswith(("#", "import ", "from "))):
                        bare.append(f"{path.relative_to(REPO)}:{inner.lineno}: {lines[inner.lineno - 1].strip()}")
    assert not bare, "function-local imports without a comment saying why:\n" + "\n".join(bare)


@pytest.mark.parametrize("name", sorted(modules()))
def test_no_module_is_over_500_lines(name):
    path = modules()[name]
    assert len(path.read_text().splitlines()) <= MAX_LINES, f"{path.relative_to(REPO)}: split it by job"


PRIVATE = re.compile(
    r"optim_step_progress|val_check_batch|total_batch_idx|_check_log_dir_exists|\._device_mesh\b|_signal_handler"
    r"|_yaml_loader|\.tqdm\s*="
)


def test_library_internals_are_touched_only_in_the_glue_module():
    users = [
        f"{path.relative_to(REPO)}:{i}"
        for name, path in modules().items()
        if name != "lit_open.glue"
        for i, line in enumerate(path.read_text().splitlines(), 1)
        if PRIVATE.search(line) and not line.lstrip().startswith("#")
    ]
    assert not users, f"private library internals outside lit_open/glue.py: {users}"


def _documented(cell: str, n: int) -> list:
    """The values of a table cell for `n` keys: `a, b` or one value for all of them."""

    def value(item):
        item = item.strip("` ") if isinstance(item, str) else item
        loaded = yaml.safe_load(item) if isinstance(item, str) else item
        try:
            return float(loaded) if isinstance(loaded, str) else loaded
        except ValueError:
            return loaded

    cell = cell.strip()
    if n > 1:
        parts = yaml.safe_load("[" + cell.replace("`", "") + "]")
        if len(parts) == n:
            return [value(p) for p in parts]
    return [value(cell)] * n


def test_the_config_defaults_in_docs_architecture_are_config_pys():
    """docs/architecture.md tabulates the config keys with their defaults: they must stay config.py's."""
    from lit_open.config import TrainConfig
    from lit_open.model.config import ModelConfig

    defaults = {
        f"{group.name}.{key}": value
        for group in dataclasses.fields(TrainConfig)
        if dataclasses.is_dataclass(group.default_factory)
        for key, value in dataclasses.asdict(group.default_factory()).items()
    }
    defaults.update({f"model.{f.name}": f.default for f in dataclasses.fields(ModelConfig)})
    text = (REPO / "docs" / "architecture.md").read_text()
    section = text[text.index("### 2.2") : text.index("### 2.3")]
    rows = re.findall(r"^\| (`[\w.]+`(?:, `[\w.]+`)*) \| ([^|]+) \| [^|]+ \|$", section, re.MULTILINE)
    checked = 0
    for keys_cell, default_cell in rows:
        names = re.findall(r"`([\w.]+)`", keys_cell)
        prefix = names[0].rsplit(".", 1)[0]
        keys = [name if "." in name else f"{prefix}.{name}" for name in names]
        for key, documented in zip(keys, _documented(default_cell, len(keys))):
            assert key in defaults, f"docs/architecture.md documents {key}, which config.py does not have"
            assert documented == defaults[key], f"{key}: documented {documented!r}, config.py {defaults[key]!r}"
            checked += 1
    assert checked >= 60  # every table row was read
