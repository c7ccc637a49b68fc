"""depthlab.research.datasets: the embedded datasets (generated, or shipped inside packages; no downloads)."""
from __future__ import annotations

import importlib


def require(module: str, extra: str, what: str = ""):
    """An optional package of an extra (`[vision]`, `[language]`, `[rl]`), imported; if it is missing (or one of
    its own dependencies is), one line naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        package = module.split(".")[0]
        head = f"{what} needs the optional package {package!r}" if what else f"the optional package {package!r} is missing"
        raise ModuleNotFoundError(f"{head} ({error}); pip install 'depthlab[{extra}]'") from None
