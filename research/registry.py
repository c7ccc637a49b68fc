"""Finds experiments: every module research/<field>/<name>.py that defines (or assigns) `get_config` and
either `make_experiment` (trained by `fit`) or `run` (a self-contained study) at its top level. Listing reads
the files' syntax only, so `depthlab list` is instant and never imports optional dependencies.

Example:
    >>> experiment_names()[:2]
    ['generative/gan_mnist', 'generative/gan_ring']
    >>> module = load_experiment("vision/digits_cnn")
"""
from __future__ import annotations

import ast
import difflib
import importlib
import os

FIELDS = ("vision", "language", "generative", "rl", "theory")
_ROOT = os.path.dirname(os.path.abspath(__file__))


def _module_names(tree: ast.Module) -> set[str]:
    """The names a module defines at its top level: functions, classes and assignment targets
    (`make_experiment = ppo_experiment` defines make_experiment as much as a `def` does)."""
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                names.update(n.id for n in ast.walk(target) if isinstance(n, ast.Name))
    return names


def _describe(path: str) -> str | None:
    """The module's one-line description if it is an experiment module (it defines `get_config` and
    `make_experiment` or `run`), else None."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), filename=path)
    names = _module_names(tree)
    if "get_config" not in names or not ({"make_experiment", "run"} & names):
        return None
    doc = ast.get_docstring(tree) or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


def list_experiments() -> dict[str, str]:
    """{"field/name": one-line description} for every experiment, sorted by name."""
    found = {}
    for field in FIELDS:
        folder = os.path.join(_ROOT, field)
        if not os.path.isdir(folder):
            continue
        for filename in sorted(os.listdir(folder)):
            if filename.endswith(".py") and not filename.startswith("_"):
                description = _describe(os.path.join(folder, filename))
                if description is not None:
                    found[f"{field}/{filename[:-3]}"] = description
    return dict(sorted(found.items()))


def experiment_names() -> list[str]:
    return list(list_experiments())


def load_experiment(name: str):
    """The experiment module for "field/name" (e.g. "vision/digits_cnn")."""
    names = experiment_names()
    if name not in names:
        close = difflib.get_close_matches(name, names, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown experiment {name!r}.{hint} Valid experiments: {', '.join(names)} "
                         f"(`depthlab list` describes each)")
    field, module = name.split("/")
    return importlib.import_module(f"depthlab.research.{field}.{module}")
