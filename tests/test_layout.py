"""The code's shape, measured on the tree: one library (chexnet/), scripts that only call it.

- the reproduction core is the modules directly in chexnet/; the analysis tools are
  chexnet/analysis/, the data tooling chexnet/datatools/; the core imports neither (inside a
  function or not), and the data tooling does not import the analysis tools;
- no module imports a command-line script (a file with `if __name__ == "__main__"`), inside a
  function or not: scripts, benchmarks and the package import only the package;
- no import cycle among the project's modules (function-local imports included);
- no function longer than 80 lines;
- importing the library changes no environment variable.
Tests are left out of the first two rules: they drive the scripts' `main()` on purpose.
"""
from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

MAX_FUNCTION_LINES = 80


def project_files() -> list[Path]:
    files = sorted(ROOT.glob("*.py")) + sorted((ROOT / "chexnet").rglob("*.py"))
    return files + sorted((ROOT / "benchmarks").glob("*.py"))


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    return ".".join(rel.parts)


def is_script(tree: ast.Module) -> bool:
    """A top-level `if __name__ == "__main__":`."""
    for node in tree.body:
        if isinstance(node, ast.If) and isinstance(node.test, ast.Compare):
            names = [n.id for n in ast.walk(node.test) if isinstance(n, ast.Name)]
            consts = [n.value for n in ast.walk(node.test) if isinstance(n, ast.Constant)]
            if "__name__" in names and "__main__" in consts:
                return True
    return False


def imported_modules(tree: ast.Module) -> set[str]:
    """Every module an import statement names, anywhere in the file (functions included):
    `from chexnet import train` names both `chexnet` and `chexnet.train`."""
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            out.add(node.module)
            out.update(f"{node.module}.{alias.name}" for alias in node.names)
    return out


def import_graph() -> tuple[dict[str, set[str]], set[str]]:
    """(module -> the project modules it imports, the modules that are scripts)."""
    trees = {module_name(p): ast.parse(p.read_text(), filename=str(p)) for p in project_files()}
    graph = {name: {m for m in imported_modules(tree) if m in trees and m != name}
             for name, tree in trees.items()}
    scripts = {name for name, tree in trees.items() if is_script(tree)}
    return graph, scripts


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}   # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


def test_the_helpers_see_cycles_and_scripts():
    """The checks below are only as good as these helpers: try them on known answers."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None
    assert is_script(ast.parse('import sys\nif __name__ == "__main__":\n    sys.exit(0)\n'))
    assert not is_script(ast.parse('def main():\n    return __name__ == "__main__"\n'))
    local = ast.parse("def f():\n    from chexnet import train as t\n    import retrain\n")
    assert {"chexnet.train", "retrain"} <= imported_modules(local)


def test_no_module_imports_a_script():
    graph, scripts = import_graph()
    offenders = sorted(f"{name} imports {dep}" for name, deps in graph.items()
                       for dep in deps if dep in scripts)
    assert offenders == []
    # The package holds the logic: none of its modules is itself a script.
    assert sorted(s for s in scripts if s.startswith("chexnet.")) == []


def test_no_import_cycle():
    graph, _ = import_graph()
    assert find_cycle(graph) is None


SUBPACKAGES = ("chexnet.analysis", "chexnet.datatools")
# The modules each sub-package must hold: moving one back into the core fails here.
ANALYSIS = {"metrics", "subgroups", "report", "heatmaps", "cam", "localization", "robustness",
            "explore", "cross_eval", "training_plots", "predict", "notebook_tools"}
DATATOOLS = {"download", "prepare", "demo", "colab", "corruptions", "convert_checkpoint",
             "fetch_reference", "cache_build"}


def layer(module: str) -> str:
    """core | analysis | datatools | outside (scripts, benchmarks)."""
    for sub in SUBPACKAGES:
        if module == sub or module.startswith(sub + "."):
            return sub.split(".")[1]
    return "core" if module.startswith("chexnet.") or module == "chexnet" else "outside"


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    allowed = {"core": {"core"}, "datatools": {"core", "datatools"},
               "analysis": {"core", "datatools", "analysis"}}
    return sorted(f"{name} ({layer(name)}) imports {dep} ({layer(dep)})"
                  for name, deps in graph.items() if layer(name) in allowed
                  for dep in deps if layer(dep) != "outside"
                  and layer(dep) not in allowed[layer(name)])


def test_the_core_imports_neither_the_analysis_tools_nor_the_data_tooling():
    assert layer_violations({"chexnet.train": {"chexnet.analysis.cam"}}) == [
        "chexnet.train (core) imports chexnet.analysis.cam (analysis)"]
    assert layer_violations({"chexnet.datatools.demo": {"chexnet.analysis.metrics"}}) != []
    assert layer_violations({"chexnet.analysis.cam": {"chexnet.train"}}) == []
    graph, _ = import_graph()
    assert layer_violations(graph) == []


def test_the_folders_show_the_architecture():
    def names(sub: str) -> set[str]:
        return {p.stem for p in (ROOT / "chexnet" / sub).glob("*.py")} - {"__init__"}
    assert names("analysis") == ANALYSIS
    assert names("datatools") == DATATOOLS
    core = {p.stem for p in (ROOT / "chexnet").glob("*.py")}
    assert not core & (ANALYSIS | DATATOOLS)


TRAIN_PY_MAX_LINES = 450
# What chexnet/train.py defines: the recipe, the schedule, the optimizer, one epoch of training,
# evaluation, and fit with its three steps. The run folder is chexnet/runs.py, the data loader
# chexnet/loaders.py, every setting chexnet/config.py.
TRAIN_PY_DEFINES = {"RECIPES", "PlateauSchedule", "make_optimizer", "NonFiniteLoss",
                    "train_one_epoch", "evaluate", "_non_finite_message", "fit", "start_run",
                    "train_epochs", "report_epoch", "final_predictions", "barrier"}


def own_names(tree: ast.Module) -> set[str]:
    """Top-level functions, classes and assigned names of a module (not what it imports)."""
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(t.id for t in targets if isinstance(t, ast.Name))
    return names


def names_taken_from(tree: ast.Module, module: str) -> set[str]:
    """The names a file takes from `module` (chexnet.train): `from chexnet.train import X`, and
    `alias.X` where `from chexnet import train as alias` or `import chexnet.train as alias`."""
    package, _, leaf = module.rpartition(".")
    taken, aliases = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == module:
            taken.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module == package:
            aliases.update(a.asname or a.name for a in node.names if a.name == leaf)
        elif isinstance(node, ast.Import):
            aliases.update(a.asname for a in node.names if a.name == module and a.asname)
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                and node.value.id in aliases):
            taken.add(node.attr)
    return taken


def test_train_py_is_the_recipe_and_the_loop():
    path = ROOT / "chexnet" / "train.py"
    assert len(path.read_text().splitlines()) <= TRAIN_PY_MAX_LINES
    assert own_names(ast.parse(path.read_text())) == TRAIN_PY_DEFINES


def test_nothing_imports_train_py_for_what_it_does_not_define():
    """The run folder, the loaders and the config are imported from their own modules: a file
    that takes `atomic_torch_save` or `load_tables` from chexnet.train (a re-export) fails."""
    sample = ast.parse("from chexnet import train as t\nt.fit(c)\nt.load_tables(c)\n"
                       "from chexnet.train import evaluate, save_text\n")
    assert names_taken_from(sample, "chexnet.train") == {"fit", "load_tables", "evaluate",
                                                         "save_text"}
    files = project_files() + sorted((ROOT / "tests").glob("*.py"))
    offenders = sorted(f"{p.relative_to(ROOT)}: {name}" for p in files
                       for name in names_taken_from(ast.parse(p.read_text()), "chexnet.train")
                       - TRAIN_PY_DEFINES)
    assert offenders == []


def test_the_design_card_files_stay_at_the_top_level():
    for name in ("retrain.py", "model.py", "cxr_dataset.py", "eval_model.py",
                 "visualize_prediction.py", "nih_batch_download_zips.py", "nih_labels.csv"):
        assert (ROOT / name).is_file(), name


def long_functions(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    return [f"{path.name}:{node.lineno} {node.name} "
            f"({node.end_lineno - node.lineno + 1} lines)"
            for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]


def test_no_function_longer_than_80_lines(tmp_path):
    long = tmp_path / "long.py"
    long.write_text("def f():\n" + "    x = 1\n" * MAX_FUNCTION_LINES)
    assert long_functions(long) == [f"long.py:1 f ({MAX_FUNCTION_LINES + 1} lines)"]
    offenders = [f for p in project_files() for f in long_functions(p)]
    assert offenders == []


LIBRARY_MODULES = ("chexnet.data", "chexnet.cache", "chexnet.train", "chexnet.analysis.heatmaps",
                   "chexnet.analysis.report")


@pytest.fixture(scope="module")
def environment_changes() -> dict[str, list[str]]:
    """{module: the environment variables that importing it changed}, from one fresh python
    that imports the modules one after another (one torch import instead of five). A module
    imported by an earlier one counts for the earlier one: any change is still caught."""
    # The third-party libraries set a few of their own (torch: TORCHINDUCTOR_CACHE_DIR, the
    # OpenMP runtime: KMP_*): they are imported first, so only the project's own changes count.
    code = ("import importlib, json, os, sys, matplotlib, pandas, sklearn, scipy, torch, "
            "torchvision; import sklearn.metrics, scipy.stats; changes = {}\n"
            f"for module in {list(LIBRARY_MODULES)!r}:\n"
            "    before = dict(os.environ); importlib.import_module(module)\n"
            "    changes[module] = sorted(k for k in set(before) | set(os.environ) "
            "if before.get(k) != os.environ.get(k))\n"
            "print(json.dumps(changes))")
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, cwd=ROOT, check=True).stdout
    return json.loads(out)


@pytest.mark.parametrize("module", LIBRARY_MODULES)
@pytest.mark.slow
def test_importing_the_library_changes_no_environment_variable(environment_changes, module):
    assert environment_changes[module] == []


# Commands that only read tables start without torchvision: importing it takes about 1.2 s
# (it loads torch._dynamo), so chexnet.data imports it where an image is resized.
TABLE_COMMANDS = ("eval_model", "plot_training", "explore_data")


@pytest.mark.slow
def test_commands_that_read_tables_do_not_import_torchvision():
    code = (f"import sys\nfor m in {list(TABLE_COMMANDS)!r}:\n    __import__(m)\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'torchvision'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, check=True).stdout
    assert out.strip() == "[]"


# --------------------------------------------------------------------------------------------
# Idle OpenMP threads sleep in every entry point (chexnet/idle_threads.py), set before torch
# --------------------------------------------------------------------------------------------
IDLE = "chexnet.idle_threads"


def imports_before_idle(tree: ast.Module) -> list[str] | None:
    """The modules imported before chexnet.idle_threads (`from __future__` left out), or None
    when the file never imports it."""
    before: list[str] = []
    for node in tree.body:
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module != "__future__":
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        if IDLE in names:
            return before
        before += names
    return None


def notebook_first_cell(path: Path) -> str:
    import json

    cells = json.loads(path.read_text())["cells"]
    return "".join(next(c for c in cells if c["cell_type"] == "code")["source"])


def test_the_idle_threads_check_sees_a_late_import():
    doc = '"""doc"""\nfrom __future__ import annotations\n'
    assert imports_before_idle(ast.parse(f"{doc}import {IDLE}\nimport torch\n")) == []
    assert imports_before_idle(ast.parse(f"import torch\nimport {IDLE}\n")) == ["torch"]
    assert imports_before_idle(ast.parse("from chexnet import idle_threads\n")) == []
    assert imports_before_idle(ast.parse("import torch\n")) is None


def test_every_entry_point_imports_idle_threads_first():
    """Scripts, benchmarks and the suite's conftest.py: before any import that may load torch."""
    entry_points = [p for p in project_files() if not p.is_relative_to(ROOT / "chexnet")
                    and is_script(ast.parse(p.read_text()))] + [ROOT / "tests" / "conftest.py"]
    assert len(entry_points) >= 20
    offenders = []
    for path in entry_points:
        before = imports_before_idle(ast.parse(path.read_text()))
        if before is None:
            offenders.append(f"{path.name}: no import of {IDLE}")
            continue
        # conftest.py may import the standard library first; nothing else may come before.
        allowed = set(sys.stdlib_module_names) if path.name == "conftest.py" else set()
        late = [n for n in before if n.split(".")[0] not in allowed]
        if late:
            offenders.append(f"{path.name}: {IDLE} after {late}")
    assert offenders == []


def test_every_notebook_first_cell_imports_idle_threads_before_anything_else_of_ours():
    notebooks = sorted((ROOT / "notebooks").glob("*.ipynb"))
    assert len(notebooks) >= 7
    for path in notebooks:
        tree = ast.parse(notebook_first_cell(path))
        names = [a.name for n in tree.body if isinstance(n, ast.Import) for a in n.names] + [
            n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
        assert IDLE in names, path.name
        third_party = [n for n in names if n.split(".")[0] not in sys.stdlib_module_names
                       and n != IDLE and n.split(".")[0] != "google"]
        assert third_party == [], (path.name, third_party)  # e.g. torch before the policy


def test_the_library_does_not_import_idle_threads():
    """Only entry points set the policy: importing chexnet.train must not change it."""
    graph, _ = import_graph()
    assert sorted(m for m, deps in graph.items() if IDLE in deps
                  and m.startswith("chexnet.")) == []


@pytest.mark.parametrize(("given", "expected"), [(None, "PASSIVE"), ("ACTIVE", "ACTIVE"),
                                                 ("passive", "passive")])
def test_idle_threads_sets_passive_unless_the_user_chose(given, expected):
    """In a fresh process, as a script starts; a user's own policy wins."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if given is not None:
        env["OMP_WAIT_POLICY"] = given
    code = (f"import sys; import {IDLE}, os; "
            "print(os.environ['OMP_WAIT_POLICY'], 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, cwd=ROOT, check=True).stdout.split()
    assert out == [expected, "False"]  # and it loads no torch itself


def requirement_lines(path: Path) -> list[str]:
    """The requirements of a requirements file, `-r` included files first, comments left out."""
    out = []
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line.startswith("-r "):
            out += requirement_lines(path.parent / line[3:].strip())
        elif line:
            out.append(line)
    return out


def test_environment_yml_pins_what_the_requirements_files_pin():
    """conda users get the same ranges, JupyterLab included, as make demo / make test."""
    import re

    pip = re.findall(r"^ {6}- (.+)$", (ROOT / "environment.yml").read_text(), re.MULTILINE)
    wanted = list(dict.fromkeys(requirement_lines(ROOT / "requirements-test.txt")))
    assert sorted(pip) == sorted(wanted + ["-e ."])
    assert any(line.startswith("jupyterlab") for line in pip)
