"""The package's layout as the README states it: every module in the README's module map, every import pointing to a
module above it in the map, no private name imported from another module, and the size bars of the architecture
(modules, functions and export cells; experiment notebooks without library code)."""
import ast
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT/"ant_nb"


def _modules() -> dict[str, Path]:
    "Module name (e.g. 'base.checks') -> its file, for every generated module."
    return {".".join(p.relative_to(PKG).with_suffix("").parts): p for p in sorted(PKG.rglob("*.py"))
            if p.name not in ("__init__.py", "_modidx.py")}


def _readme_map() -> list[str]:
    "The modules of the README's module map, top to bottom (the first column's `ant_nb.<module>`)."
    rows = re.findall(r"^\| `ant_nb\.([\w.]+)`", (ROOT/"README.md").read_text(), flags=re.M)
    assert rows, "README.md has no module map (a table whose first column is `ant_nb.<module>`)"
    return rows


def _imports(name: str, path: Path) -> list[tuple[str, list[str]]]:
    "(imported ant_nb module, imported names) of every `from ... import` of the package in a module."
    out, package = [], name.split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.ImportFrom): continue
        if node.level: # relative: from ..base.checks import x
            base = package[:len(package) - node.level + 1]
            target = ".".join(base + ([node.module] if node.module else []))
        elif node.module and node.module.startswith("ant_nb."): target = node.module[len("ant_nb."):]
        else: continue
        out.append((target, [a.name for a in node.names]))
    return out


def test_every_module_is_in_the_readme_map_in_import_order():
    order, modules = _readme_map(), _modules()
    assert sorted(order) == sorted(modules), f"README map and package differ: {sorted(set(order) ^ set(modules))}"
    rank = {m: i for i, m in enumerate(order)}
    upward = [f"{m} imports {t}" for m, p in modules.items() for t, _ in _imports(m, p) if rank[t] >= rank[m]]
    assert not upward, f"imports that do not point to a module above in the README map: {upward}"


def test_no_private_names_cross_modules():
    private = [f"{m} imports {t}.{n}" for m, p in _modules().items() for t, names in _imports(m, p) for n in names
               if n.startswith("_")]
    assert not private, private


def test_size_bars():
    "No module over 400 lines, no function over 60 lines."
    long_modules = {m: n for m, p in _modules().items() if (n := len(p.read_text().splitlines())) > 400}
    long_functions = [f"{m}.{node.name}: {node.end_lineno - node.lineno + 1}" for m, p in _modules().items()
                      for node in ast.walk(ast.parse(p.read_text()))
                      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60]
    assert not long_modules and not long_functions, (long_modules, long_functions)


def _cells(nb: Path) -> list[dict]:
    return json.loads(nb.read_text())["cells"]


def test_export_cells_are_short():
    long = [f"{nb.name}: {n} lines" for nb in sorted((ROOT/"nbs"/"api").glob("*.ipynb")) for c in _cells(nb)
            if c["cell_type"] == "code" and "".join(c["source"]).startswith("#| export")
            and (n := len("".join(c["source"]).splitlines())) > 60]
    assert not long, long


@pytest.mark.parametrize("nb", sorted((ROOT/"nbs").glob("[1-9]*.ipynb")), ids=lambda p: p.name)
def test_experiment_notebooks_hold_calls_only(nb):
    "Parameters, calls, tables, figures and prose: no def or class, at most 80 code lines."
    code = ["".join(c["source"]) for c in _cells(nb) if c["cell_type"] == "code"]
    defs = [line for src in code for line in src.splitlines() if re.match(r"\s*(def|class)\s", line)]
    assert not defs, defs
    assert sum(len(src.splitlines()) for src in code) <= 80
