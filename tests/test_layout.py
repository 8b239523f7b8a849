"""
Guards the layout a reader relies on: the top-level files import each other in reading order
(model, common and tasks/ know no method; star.py builds on them; vstar.py and rl.py on star.py;
search.py and sos.py on both star.py and vstar.py; quiet_star.py on model and common alone;
train.py on everything), with no import cycle and no import of a project file inside a function
(the way a cycle is dodged).

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
    "sos": BASE | {"star", "vstar"}, "quiet_star": BASE, "rl": BASE | {"star"},
    "score": BASE | {"star", "rl"},
    "train": BASE | {"star", "vstar", "search", "sos", "quiet_star", "rl", "score"},
}


def project_files():
    """{module name: its source files}: every top-level .py file, and each top-level folder of
    .py files (tasks/) as one module; tests/ is not part of the program."""
    files = {}
    for entry in sorted(os.listdir(ROOT)):
        path = os.path.join(ROOT, entry)
        if entry.endswith(".py"):
            files[entry[:-3]] = [path]
        elif os.path.isdir(path) and entry != "tests" and not entry.startswith("."):
            inner = [os.path.join(path, f) for f in os.listdir(path) if f.endswith(".py")]
            if inner:
                files[entry] = inner
    return files


def imports_of(path, names):
    """(project modules imported at module level, those imported inside a function, class or
    lambda, or by name at run time: importlib.import_module("m"), __import__("m")), each a set
    of names from `names`. An import under a module-level if or try counts as module level."""
    tree = ast.parse(open(path).read(), path)
    top, nested = set(), set()

    def visit(node, inside):
        found = set()
        if isinstance(node, ast.Import):
            found = {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found = {node.module.split(".")[0]}
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str) and ast.unparse(node.func) in (
                    "importlib.import_module", "import_module", "__import__"):
            nested.update({node.args[0].value.split(".")[0]} & names)
        (nested if inside else top).update(found & names)
        inside = inside or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef,
                                             ast.Lambda))
        for child in ast.iter_child_nodes(node):
            visit(child, inside)
    visit(tree, False)
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


def test_imports_are_read_wherever_they_hide(tmp_path):
    path = tmp_path / "m.py"
    path.write_text("import star\ntry:\n    import vstar\nexcept ImportError:\n    pass\n"
                    "def f():\n    from search import run\n    importlib.import_module('sos')\n"
                    "g = lambda: __import__('train')\n")
    top, nested = imports_of(str(path), {"star", "vstar", "search", "sos", "train"})
    assert top == {"star", "vstar"} and nested == {"search", "sos", "train"}


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
