"""depthlab.research.datasets: the embedded datasets (generated, or shipped inside packages; no downloads)."""
from __future__ import annotations

import importlib


def require(module: str, extra: str):
    """An optional data package, imported; if it is missing, one line naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ModuleNotFoundError(f"{module.split('.')[0]} is not installed; pip install 'depthlab[{extra}]' "
                                  f"(or the package alone)") from None
