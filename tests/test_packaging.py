"""A non-editable install (`pip install .`) holds every module of the tree under depthlab.*"""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FOLDERS = {"models": "depthlab/models", "train": "depthlab/train", "research": "depthlab/research"}


def _tree_modules():
    found = set()
    for folder, target in FOLDERS.items():
        for dirpath, dirnames, filenames in os.walk(os.path.join(ROOT, folder)):
            dirnames[:] = [d for d in dirnames if d != "__pycache__"]
            for f in filenames:
                if f.endswith(".py"):
                    rel = os.path.relpath(os.path.join(dirpath, f), os.path.join(ROOT, folder))
                    found.add(os.path.join(target, rel))
    return found


def test_non_editable_install_holds_every_module(tmp_path):
    target = tmp_path / "site"
    result = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation",
                             "--quiet", "--target", str(target), ROOT], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    installed = set()
    for dirpath, _, filenames in os.walk(target / "depthlab"):
        for f in filenames:
            if f.endswith(".py"):
                installed.add(os.path.relpath(os.path.join(dirpath, f), target))
    missing = _tree_modules() - installed
    assert not missing, f"modules missing from the wheel (add their package to pyproject.toml): {sorted(missing)}"
    # The installed copy imports on its own, away from the checkout.
    check = subprocess.run([sys.executable, "-c", "import depthlab.models, depthlab.train, depthlab.research.cli; "
                            "print(depthlab.models.__file__)"], capture_output=True, text=True,
                           cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(target)})
    assert check.returncode == 0, check.stderr[-2000:]
    assert str(target) in check.stdout


# A distribution whose import name differs from its name, or that is used without an import statement.
_IMPORT_NAMES = {"scikit-learn": ["sklearn"], "ml-collections": ["ml_collections"], "orbax-checkpoint": ["orbax"],
                 "jaxlib": ["jax"], "tensorflow-datasets": ["tensorflow_datasets"], "pytest-xdist": ['"-n"', "-n 2"],
                 "ipykernel": ["kernel_name", "python3"], "setuptools": ["--no-build-isolation"],
                 "wheel": ["--no-build-isolation"], "ipywidgets": ["tqdm.auto"],
                 "array-record": ["array_record"], "pillow": ["PIL"], "absl-py": ["absl"]}


def _declared():
    import tomllib
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    names = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        names += extra
    import re
    return sorted({re.split(r"[<>=!~ \[;]", n, maxsplit=1)[0] for n in names})


def test_every_declared_dependency_is_used():
    sources = []
    for folder in ("models", "train", "research", "tests", "benchmarks", "colab", ".ci"):
        for dirpath, dirnames, filenames in os.walk(os.path.join(ROOT, folder)):
            dirnames[:] = [d for d in dirnames if d != "__pycache__"]
            sources += [open(os.path.join(dirpath, f), encoding="utf-8").read() for f in filenames
                        if f.endswith((".py", ".ipynb")) or f == "run"]
    text = "\n".join(sources)
    table = text.index("# A distribution whose import name")            # this test's own table is no use
    text = text[:table] + text[text.index("def _declared", table):]
    unused = []
    for name in _declared():
        modules = _IMPORT_NAMES.get(name, [name.replace("-", "_")])
        patterns = [f"import {m}" for m in modules] + [f"from {m}" for m in modules] + \
                   [f'"{m}"' for m in modules] + [f'"{m}.' for m in modules] + \
                   [m for m in modules if not m.isidentifier()]   # import x, from x, "x" / "x.y" (importlib)
        if not any(p in text for p in patterns):
            unused.append(name)
    assert not unused, f"declared in pyproject.toml but used nowhere: {unused}"
