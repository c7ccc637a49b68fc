"""No module of models/, train/ or research/ uses another module's private name: every `from X import _name`
and every `X._name` (X a name bound by an import of a depthlab module) is reported as file:line.

A module's own private names are fine (`self._cache`, a module-level `_helper` used in its own file), and so
are dunder names (`__version__`). What one module needs from another is public, with a docstring.
"""
import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FOLDERS = {"models": "depthlab.models", "train": "depthlab.train", "research": "depthlab.research"}

# Private names used across modules in files this check found them in, as (file, name); each is to be made
# public (or moved to where it is used) by its owner. An entry that no longer occurs fails the test, so the
# list only shrinks.
KNOWN: set[tuple[str, str]] = set()


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _module_name(path: str) -> str:
    folder, rel = path.split(os.sep, 1)
    parts = rel[:-len(".py")].split(os.sep)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join([FOLDERS[folder], *parts])


def _absolute(module: str, node: ast.ImportFrom) -> str:
    """The module an ImportFrom names, with relative imports (`from .records import x`) resolved."""
    if not node.level:
        return node.module or ""
    package = module.split(".")
    base = package[:len(package) - node.level]
    return ".".join(base + ([node.module] if node.module else []))


def private_uses(source: str, path: str) -> list[tuple[int, str]]:
    """[(line, "what")] for each use in `source` (the file at `path`, relative to the repository root) of
    another depthlab module's private name."""
    module = _module_name(path) if path.split(os.sep, 1)[0] in FOLDERS else "depthlab.x"
    if os.path.basename(path) == "__init__.py":
        module += ".__init__"       # a package's relative imports resolve from the package itself
    tree = ast.parse(source, filename=path)
    found, imported = [], set()     # imported: local names bound to depthlab modules or their members
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            origin = _absolute(module, node)
            if not (origin.startswith("depthlab") or node.level):
                continue
            for alias in node.names:
                if _private(alias.name):
                    found.append((node.lineno, f"from {origin} import {alias.name}"))
                imported.add(alias.asname or alias.name)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("depthlab"):
                    imported.add(alias.asname or alias.name.split(".")[0])
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr):
            base = node.value
            while isinstance(base, ast.Attribute):          # depthlab.train.data._x: the chain's root
                base = base.value
            if isinstance(base, ast.Name) and base.id in imported:
                found.append((node.lineno, f"{ast.unparse(node)}"))
    return sorted(found)


def _tree_files():
    for folder in FOLDERS:
        for dirpath, dirnames, filenames in os.walk(os.path.join(ROOT, folder)):
            dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
            for f in sorted(filenames):
                if f.endswith(".py"):
                    yield os.path.relpath(os.path.join(dirpath, f), ROOT)


def test_no_module_uses_another_modules_private_name():
    seen, bad = set(), []
    for path in _tree_files():
        with open(os.path.join(ROOT, path), encoding="utf-8") as f:
            uses = private_uses(f.read(), path)
        for line, what in uses:
            name = what.rsplit(" ", 1)[-1].rsplit(".", 1)[-1]
            if (path, name) in KNOWN:
                seen.add((path, name))
            else:
                bad.append(f"{path}:{line}: {what}")
    assert not bad, "private names of other modules (make them public, or keep them in their module):\n" + \
        "\n".join(bad)
    assert not KNOWN - seen, f"no longer used, delete from KNOWN: {sorted(KNOWN - seen)}"


def test_the_check_finds_each_kind_of_private_use():
    source = """
from depthlab.train.data import _check, fine
from depthlab.train import data as data_lib
from .records import _first
import depthlab.train.loop
from numpy import _private_but_not_ours
import os

data_lib._rows(1)
depthlab.train.loop._merge({})
os._exit(0)
self_like = object()
self_like._own
data_lib.__doc__
"""
    uses = private_uses(source, os.path.join("train", "streaming", "batches.py"))
    assert uses == [(2, "from depthlab.train.data import _check"), (4, "from depthlab.train.streaming.records "
                    "import _first"), (9, "data_lib._rows"), (10, "depthlab.train.loop._merge")], uses
