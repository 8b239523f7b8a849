"""
Guards the layout a reader relies on: the top-level files import each other in reading order
(model, common and tasks/ know no method; star.py builds on them; vstar.py on star.py; search.py
and sos.py on both; quiet_star.py on model and common alone; train.py on everything), with no
import cycle and no import of a project file inside a function (the way a cycle is dodged).

Run: python -m pytest tests/test_layout.py
"""

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = {"model", "common", "tasks"}
ALLOWED = {  # each file: the project files it may import
    "model": set(), "common": {"model"}, "tasks": set(),
    "star": BASE, "vstar": BASE | {"star"}, "search": BASE | {"star", "vstar"},
    "sos": BASE | {"star", "vstar"}, "quiet_star": BASE,
    "train": BASE | {"star", "vstar", "search", "sos", "quiet_star"},
}


def project_files():
    """{module name: its source files}: every top-level .py file, and tasks/ as one module."""
    files = {f[:-3]: [os.path.join(ROOT, f)] for f in os.listdir(ROOT) if f.endswith(".py")}
    files["tasks"] = [os.path.join(ROOT, "tasks", f)
                      for f in os.listdir(os.path.join(ROOT, "tasks")) if f.endswith(".py")]
    return files


def imports_of(path, names):
    """(project modules imported at the top level of the file, those imported inside a function
    or class), each a set of names from `names`."""
    tree = ast.parse(open(path).read(), path)
    top, nested = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found = {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found = {node.module.split(".")[0]}
        else:
            continue
        (top if node in tree.body else nested).update(found & names)
    return top, nested


def graph():
    """{module: the project modules it imports at its top level}, and the nested imports."""
    files = project_files()
    edges, nested = {}, {}
    for name, paths in files.items():
        edges[name], nested[name] = set(), set()
        for path in paths:
            top, inner = imports_of(path, set(files))
            edges[name] |= top - {name}
            nested[name] |= inner - {name}
    return edges, nested


def find_cycle(edges):
    """A list of modules that import each other in a circle, or None."""
    state = {}  # 1: on the current path, 2: done

    def visit(m, path):
        state[m] = 1
        for n in sorted(edges.get(m, ())):
            if state.get(n) == 1:
                return path[path.index(n):] + [n]
            if n not in state and (c := visit(n, path + [n])):
                return c
        state[m] = 2
        return None
    for m in sorted(edges):
        if m not in state and (c := visit(m, [m])):
            return c
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle_among_the_top_level_files():
    edges, _ = graph()
    assert find_cycle(edges) is None


def test_no_project_file_is_imported_inside_a_function():
    _, nested = graph()
    assert {m: n for m, n in nested.items() if n} == {}


@pytest.mark.parametrize("module", sorted(ALLOWED))
def test_each_file_imports_only_what_comes_before_it(module):
    edges, _ = graph()
    assert edges[module] <= ALLOWED[module], edges[module] - ALLOWED[module]


def test_every_top_level_file_has_its_place():
    assert set(project_files()) == set(ALLOWED)  # a new method file: give it a row above
