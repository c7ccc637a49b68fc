"""depthlab.research.datasets: the embedded datasets (generated, or shipped inside packages; no downloads).

`require(module, extra, what)` imports an optional package of an extra (`[vision]`, `[language]`, `[rl]`, ...)
or fails with one line naming the extra; it is the engine's `depthlab.train.optional.require`, re-exported here.
"""
from __future__ import annotations

from depthlab.train.optional import require

__all__ = ["require"]
