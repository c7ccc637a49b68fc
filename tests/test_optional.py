"""One `require` for optional packages (depthlab.train.optional): the message names what needed the package,
the package and the extra that installs it; its table of extras agrees with pyproject.toml."""
import os
import re
import tomllib

import pytest

from depthlab.research import datasets
from depthlab.train import optional, streaming

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_a_missing_package_names_what_needed_it_and_the_extra():
    with pytest.raises(ModuleNotFoundError) as e:
        optional.require("depthlab_no_such_package.sub", "stream", "streaming input")
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith("streaming input needs the optional package 'depthlab_no_such_package'"), message
    assert "pip install 'depthlab[stream]' (grain, array-record, pyarrow" in message, message
    with pytest.raises(ModuleNotFoundError, match=r"^the optional package 'depthlab_nope' is missing .*\[vision\]"):
        optional.require("depthlab_nope", "vision")


def test_an_installed_package_is_returned_and_an_unknown_extra_fails_even_then():
    assert optional.require("os.path", "stream") is os.path
    with pytest.raises(ValueError, match="unknown extra 'streem'; use one of vision, language, stream"):
        optional.require("os", "streem")


def test_one_require_everywhere():
    assert datasets.require is optional.require and streaming.require is optional.require


def test_the_extras_table_matches_pyproject():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        extras = tomllib.load(f)["project"]["optional-dependencies"]
    declared = {name: tuple(re.split(r"[<>=!~ \[;]", spec, maxsplit=1)[0] for spec in specs)
                for name, specs in extras.items() if name != "test"}
    assert optional.EXTRAS == declared
