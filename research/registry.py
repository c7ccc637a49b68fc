"""Finds experiments. An experiment is a module that defines (or assigns) `get_config` and either
`make_experiment` (trained by `fit`) or `run` (a self-contained study) at its top level, named by any of:

- "field/name": depthlab's own research/<field>/<name>.py (e.g. "vision/digits_cnn");
- a path to a Python file, e.g. "my_experiment.py" or "experiments/resnet_ablation.py" (your own, anywhere);
- an entry point: an installed package declares its experiments in the `depthlab.experiments` group,
  name -> module path, e.g. in its pyproject.toml
  `[project.entry-points."depthlab.experiments"]` `"mylab/resnet" = "mylab.experiments.resnet"`.

Listing reads the files' syntax only (and the installed packages' entry-point tables), so `depthlab list` is
instant and never imports optional dependencies. A run records `canonical_name(name)` in its experiment.json
(a file by its absolute path), from which `depthlab eval --workdir` and `depthlab report` rebuild it.

Example:
    >>> experiment_names()[:2]
    ['generative/gan_mnist', 'generative/gan_ring']
    >>> module = load_experiment("vision/digits_cnn")
    >>> mine = load_experiment("path/to/my_experiment.py")
"""
from __future__ import annotations

import ast
import difflib
import hashlib
import importlib
import importlib.util
import os
import re
import sys

FIELDS = ("vision", "language", "generative", "rl", "theory")
ENTRY_POINT_GROUP = "depthlab.experiments"
_ROOT = os.path.dirname(os.path.abspath(__file__))
_PACKAGE = os.path.dirname(_ROOT)


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
        elif isinstance(node, (ast.Import, ast.ImportFrom)):   # `from mylab.exp import get_config, run`
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
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


def _builtin_experiments() -> dict[str, str]:
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
    return found


def entry_points() -> dict[str, str]:
    """{name: module path} of the experiments installed packages declare (group `depthlab.experiments`)."""
    from importlib.metadata import entry_points as _entry_points

    return {ep.name: ep.value for ep in _entry_points(group=ENTRY_POINT_GROUP)}


def _module_file(module_path: str) -> str | None:
    """The source file of an importable module path, found without importing it (or its packages)."""
    top, *rest = module_path.split(":")[0].split(".")
    try:
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.origin or not os.path.isfile(spec.origin):
        return None
    if not rest:
        return spec.origin
    base = os.path.join(os.path.dirname(spec.origin), *rest)
    return next((p for p in (base + ".py", os.path.join(base, "__init__.py")) if os.path.isfile(p)), None)


def list_experiments(paths=()) -> dict[str, str]:
    """{name: one-line description}: depthlab's experiments and the installed packages' (entry points), sorted
    by name; with `paths` (files or folders), the experiment files found there instead."""
    if paths:
        found = {}
        for path in paths:
            if os.path.isdir(path):
                files = [os.path.join(path, f) for f in sorted(os.listdir(path))
                         if f.endswith(".py") and not f.startswith("_")]
            elif os.path.isfile(path):
                files = [path]
            else:
                raise FileNotFoundError(f"no such experiment file or folder {path!r}")
            for file in files:
                try:
                    description = _describe(file)
                except (SyntaxError, UnicodeDecodeError) as e:
                    description = f"(cannot be parsed: {type(e).__name__}: {e})"
                if description is not None:
                    found[file] = description
        return dict(sorted(found.items()))
    found = _builtin_experiments()
    for name, value in entry_points().items():
        file = _module_file(value)
        try:
            description = _describe(file) if file else None
        except (SyntaxError, UnicodeDecodeError, OSError):
            description = None
        found.setdefault(name, description if description else f"({value}, from an installed package)")
    return dict(sorted(found.items()))


def experiment_names() -> list[str]:
    return list(list_experiments())


def is_file_name(name: str) -> bool:
    """Whether `name` names an experiment by its file (it ends in .py)."""
    return name.endswith(".py")


def canonical_name(name: str) -> str:
    """The name a run records: a file's absolute path, any other name as given."""
    return os.path.abspath(name) if is_file_name(name) else name


def short_name(name: str) -> str:
    """A file-system friendly name: "vision_digits_cnn", "my_experiment" for path/to/my_experiment.py."""
    if is_file_name(name):
        return os.path.splitext(os.path.basename(name))[0]
    return re.sub(r"[^\w.-]+", "_", name)


def _load_file(path: str):
    """The module of an experiment file, imported once per absolute path (a second load returns it)."""
    path = os.path.abspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no experiment file {path!r}: give the path of a .py file that defines "
                                f"get_config and make_experiment (or run)")
    stem = re.sub(r"\W", "_", os.path.splitext(os.path.basename(path))[0])
    module_name = f"_depthlab_experiment_{stem}_{hashlib.sha1(path.encode()).hexdigest()[:8]}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    if _describe(path) is None:
        raise ValueError(f"{path!r} is not an experiment: it must define get_config and make_experiment (trained "
                         f"by fit) or run (a study) at its top level")
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module   # before executing it: dataclasses and pickle look the module up
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[module_name]
        raise
    return module


def load_experiment(name: str):
    """The experiment module for "field/name" (e.g. "vision/digits_cnn"), a path to a .py file, or an entry
    point's name."""
    if is_file_name(name):
        return _load_file(name)
    if name.count("/") == 1 and name.split("/")[0] in FIELDS:   # a built-in one: its own file, not all of them
        path = os.path.join(_ROOT, *name.split("/")) + ".py"
        if os.path.isfile(path) and _describe(path) is not None:
            field, module = name.split("/")
            return importlib.import_module(f"depthlab.research.{field}.{module}")
    builtin = _builtin_experiments()
    if name in builtin:
        field, module = name.split("/")
        return importlib.import_module(f"depthlab.research.{field}.{module}")
    installed = entry_points()
    if name in installed:
        return importlib.import_module(installed[name].split(":")[0])
    names = sorted({*builtin, *installed})
    close = difflib.get_close_matches(name, names, n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise ValueError(f"unknown experiment {name!r}.{hint} Valid experiments: {', '.join(names)}, or the path "
                     f"of your own .py file (`depthlab list` describes each)")


def project_url(kind: str = "Repository") -> str | None:
    """The project's home as the installed package declares it (pyproject.toml's [project.urls], read through
    importlib.metadata): the one place the notebooks' install cells and the README point to. None when depthlab
    is not installed as a distribution or declares no such URL."""
    from importlib.metadata import PackageNotFoundError, metadata

    try:
        urls = metadata("depthlab").get_all("Project-URL") or []
    except PackageNotFoundError:
        return None
    found = dict(u.split(", ", 1) for u in urls if ", " in u)
    return found.get(kind)


def experiment_file(name: str) -> str | None:
    """The source file of an experiment, found without importing it (None when it cannot be known)."""
    if is_file_name(name):
        return os.path.abspath(name)
    if "/" in name and name.split("/")[0] in FIELDS:
        path = os.path.join(_ROOT, *name.split("/")) + ".py"
        if os.path.isfile(path):
            return path
    value = entry_points().get(name)
    return _module_file(value) if value else None


def code_fingerprint(name: str) -> str | None:
    """A digest of the size and modification time of the experiment's file and of every module of depthlab
    (models/, train/, research/): equal fingerprints mean no code that builds the config changed. None when the
    experiment's file cannot be found."""
    file = experiment_file(name)
    if file is None:
        return None
    digest = hashlib.sha1()
    files = [file]
    for part in ("models", "train", "research"):
        for folder, dirs, names in os.walk(os.path.join(_PACKAGE, part)):
            dirs[:] = sorted(d for d in dirs if d != "__pycache__")
            files += [os.path.join(folder, n) for n in sorted(names) if n.endswith(".py")]
    for path in files:
        st = os.stat(path)
        digest.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()
