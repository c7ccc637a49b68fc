"""The declared config schema (train/schema.py, research/config_schema.py) and the npz loader's data checks:
a bad value for any key of any experiment, or a bad array in an .npz file, is one line naming the key (or the
file), exit 2, and nothing is written in the run directory. Validation only: nothing here trains or compiles.

The Hypothesis tests draw a bounded number of examples in the fast suite; `-m slow` runs the full search.
"""
from __future__ import annotations

import contextlib
import functools
import io
import math
import os
import tempfile

import ml_collections
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from depthlab.research.cli import main
from depthlab.research.config_schema import check_config_domains, experiment_rules
from depthlab.research.registry import list_experiments, load_experiment
from depthlab.research.runner import _coerce, _parse_value, apply_overrides, build_config
from depthlab.train import schema
from depthlab.train.schema import ConfigValueError, domain_of, flat


# ---- the vocabulary ------------------------------------------------------------------------------------------

def test_domains_accept_their_values_and_describe_them():
    assert schema.probability().accepts(0.0) and not schema.probability().accepts(1.0)
    assert not schema.probability().accepts(float("nan")) and not schema.probability().accepts(True)
    assert schema.seed().accepts(2**32 - 1) and not schema.seed().accepts(2**32) and not schema.seed().accepts(-1)
    assert schema.sizes().accepts((256, 256, 10)) and schema.sizes().accepts(16)
    assert not schema.sizes().accepts((256, 0, 10)) and not schema.sizes().accepts(())
    assert schema.sizes(empty_ok=True).accepts(())
    assert schema.integer(1, also=(-1,)).accepts(-1) and not schema.integer(1, also=(-1,)).accepts(0)
    assert not schema.integer(0).accepts(2.0) and schema.number(0.0).accepts(2)
    assert schema.choice("a", "b").describe() == "one of a, b"
    assert schema.probability().describe() == "a number in [0, 1) (a probability)"
    assert schema.seed().describe() == "an integer in [0, 2**32) (a seed)"


def test_the_error_is_one_line_with_the_key_what_was_expected_and_the_fix():
    config = ml_collections.ConfigDict({"model": {"dropout": 0.1}})
    config.model.dropout = 1.5
    with pytest.raises(ConfigValueError) as e:
        schema.check(config, [("*dropout", schema.probability())], defaults={"model": {"dropout": 0.1}})
    assert e.value.key == "model.dropout"
    assert str(e.value) == ("model.dropout=1.5: expected a number in [0, 1) (a probability); fix: pass "
                            "--config.model.dropout=0.1 (its default) or another value of that kind")


# ---- every experiment's config -------------------------------------------------------------------------------

@functools.cache
def _experiments() -> tuple[str, ...]:
    return tuple(sorted(list_experiments()))


@functools.cache
def _module(name: str):
    return load_experiment(name)   # the registry parses every experiment file per call: once per name here


@functools.cache
def _keys() -> tuple[tuple[str, str, schema.Domain, object], ...]:
    """(experiment, key, domain, default) for every key of every experiment's default config."""
    out = []
    for name in _experiments():
        module = _module(name)
        rules = experiment_rules(name, module)
        for key, default in flat(module.get_config(None)).items():
            out.append((name, key, domain_of(key, rules, default)[0], default))
    return tuple(out)


def test_every_default_and_every_preset_is_inside_its_schema():
    for name in _experiments():
        module = _module(name)
        for preset in (None, *sorted(getattr(module, "PRESETS", {}))):
            check_config_domains(name, module.get_config(preset), preset, module=module)


def test_the_common_keys_are_declared_not_inferred():
    declared = {(name, key): domain for name, key, domain, _ in _keys()}
    assert declared["vision/digits_mlp", "model.dropout"] == schema.probability("a dropout rate")
    assert declared["vision/digits_mlp", "seed"] == schema.seed()
    assert declared["vision/digits_mlp", "model.features"].kind == "sizes"
    assert declared["vision/digits_mlp", "data.eval_batch_size"].low == 1
    assert declared["vision/digits_mlp", "optim.name"].choices[:2] == ("sgd", "momentum")
    assert declared["generative/gan_mnist", "d_optim.b1"] == declared["vision/digits_mlp", "optim.b1"]
    assert declared["vision/digits_mlp", "train.steps"].low == 1


def _cli(value) -> str:
    if isinstance(value, tuple):
        return "(" + ",".join(map(str, value)) + ("," if len(value) == 1 else "") + ")"
    return str(value)


def bad_values(domain: schema.Domain, default) -> st.SearchStrategy[str] | None:
    """Command-line texts of values outside `domain` (None: the domain takes anything a command line can say)."""
    options = []
    if domain.kind in ("int", "float"):
        low, high = domain.low, domain.high
        if low is not None:
            ints = st.integers(max_value=math.ceil(low) - (0 if domain.low_open and low == int(low) else 1))
            options.append(ints.filter(lambda v: v not in domain.choices and not domain.accepts(v)).map(str))
            options.append(st.floats(max_value=low, allow_nan=False, allow_infinity=False)
                           .filter(lambda v: not domain.accepts(v)).map(repr))
        if high is not None:
            options.append(st.integers(min_value=math.ceil(high) if domain.high_open else math.floor(high) + 1)
                           .map(str))
        if domain.kind == "int":
            options.append(st.sampled_from(["2.5", "true", "abc", "(1,2)"]))
        else:
            options.append(st.sampled_from(["1e999", "-1e999", "abc", "true", "(1,2)"]))
    elif domain.kind == "bool":
        options.append(st.sampled_from(["3", "abc", "0.5", "(1,2)"]))
    elif domain.kind == "str" and domain.choices:
        options.append(st.from_regex(r"\A[a-z_]{1,12}\Z").filter(lambda v: v not in domain.choices))
    elif domain.kind == "sizes":
        low = int(domain.low)
        options.append(st.lists(st.integers(min_value=low, max_value=512), max_size=3).flatmap(
            lambda good: st.integers(max_value=low - 1).map(lambda bad: _cli((*good, bad)))))
        options.append(st.sampled_from(["abc", "(2.5,)"] + ([] if domain.empty_ok else ["()"])))
    return st.one_of(options).filter(lambda text: _rejected(domain, default, text)) if options else None


def _rejected(domain: schema.Domain, default, text: str) -> bool:
    """Whether the command-line text `text` is outside `domain` once parsed and coerced as an override is (the
    strategies above must never draw a good value: that would train a run)."""
    try:
        value = _coerce(_parse_value(text), default, "key")
    except ValueError:
        return True
    return not domain.accepts(value)


def _checkable() -> list[tuple[str, str, schema.Domain, object]]:
    return [k for k in _keys() if bad_values(k[2], k[3]) is not None]


def _run_cli(argv: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(argv)
    return code, err.getvalue()


def _assert_one_line_and_nothing_written(code: int, err: str, workdir: str, named: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("depthlab: error: ") and named in lines[0], err
    assert "expected" in lines[0] and "fix" in lines[0], err
    assert not os.path.exists(workdir), os.listdir(workdir)


def test_every_key_of_every_experiment_rejects_a_value_outside_its_domain():
    """One bad value per key (the first the strategy's bounds give), through the override parser and the
    schema, without building anything: ConfigValueError naming that key."""
    checked = 0
    for name, key, domain, default in _checkable():
        value = _first_bad(domain)
        try:
            parsed = apply_overrides(_one_key_config(key, default), {key: value})
            parsed_value = flat(parsed)[key]
        except ConfigValueError as e:
            assert e.key == key, (name, key, value, e)
            checked += 1
            continue
        assert not domain.accepts(parsed_value), (name, key, value, parsed_value)
        checked += 1
    assert checked > 500


def _first_bad(domain: schema.Domain) -> str:
    if domain.kind in ("int", "float"):
        if domain.low is not None:
            return str(int(domain.low) - 1 if domain.kind == "int" else domain.low - 1.0)
        if domain.high is not None:
            return str(math.ceil(domain.high))
        return "abc"
    if domain.kind == "sizes":
        return f"(4,{int(domain.low) - 1})"
    if domain.kind == "str":
        return "no_such_choice"
    return "abc"


def _one_key_config(key: str, default) -> ml_collections.ConfigDict:
    tree: dict = {}
    node = tree
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = default
    return ml_collections.ConfigDict(tree)


@st.composite
def _bad_override(draw):
    name, key, domain, default = draw(st.sampled_from(_checkable()))
    return name, key, domain, default, draw(bad_values(domain, default))


def _check_bad_override(case) -> None:
    name, key, domain, default, value = case
    assert _rejected(domain, default, value), (name, key, value)   # never start a run with a good value
    with tempfile.TemporaryDirectory() as tmp:
        workdir = os.path.join(tmp, "run")
        code, err = _run_cli(["run", name, "--workdir", workdir, f"--config.{key}={value}"])
        _assert_one_line_and_nothing_written(code, err, workdir, f"{key}=")


@settings(max_examples=30, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(_bad_override())
def test_a_bad_value_for_any_key_is_exit_2_one_line_and_nothing_written(case):
    _check_bad_override(case)


@pytest.mark.slow
@settings(max_examples=800, deadline=None, suppress_health_check=list(HealthCheck))
@given(_bad_override())
def test_a_bad_value_for_any_key_full_search(case):
    _check_bad_override(case)


@pytest.mark.slow
def test_every_key_through_build_config():
    for name, key, domain, _ in _checkable():
        with pytest.raises(ConfigValueError) as e:
            build_config(name, None, {key: _first_bad(domain)}, module=_module(name))
        assert e.value.key == key


# ---- the npz loader -------------------------------------------------------------------------------------------

NPZ_FAULTS = ("float labels", "negative label", "label past the output width", "huge int64 label", "one-hot labels",
              "empty inputs", "object array", "truncated file", "lengths differ", "inputs of rank 2",
              "missing array", "string inputs", "NaN input")


@st.composite
def _bad_npz(draw):
    fault = draw(st.sampled_from(NPZ_FAULTS))
    n = draw(st.integers(16, 40))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    x = rng.random((n, 8, 8)).astype(draw(st.sampled_from([np.float32, np.float64])))
    y = np.arange(n) % 10
    arrays = {"x_train": x, "y_train": y, "x_test": x[:8], "y_test": y[:8]}
    split = draw(st.sampled_from(["train", "test"]))
    xk, yk = f"x_{split}", f"y_{split}"
    row = draw(st.integers(0, len(arrays[yk]) - 1))
    if fault == "float labels":
        arrays[yk] = arrays[yk].astype(np.float32) + draw(st.sampled_from([0.0, 0.5]))
    elif fault == "negative label":
        arrays[yk] = arrays[yk].copy()
        arrays[yk][row] = draw(st.integers(-2**40, -1))
    elif fault == "label past the output width":
        arrays[yk] = arrays[yk].copy()
        arrays[yk][row] = draw(st.integers(10, 2**31 - 1))
    elif fault == "huge int64 label":
        arrays[yk] = arrays[yk].astype(np.int64)
        arrays[yk][row] = draw(st.integers(2**31, 2**62))
    elif fault == "one-hot labels":
        arrays[yk] = np.eye(10, dtype=np.int64)[arrays[yk]]
    elif fault == "empty inputs":
        arrays[xk], arrays[yk] = arrays[xk][:0], arrays[yk][:0]
    elif fault == "object array":
        arrays[draw(st.sampled_from([xk, yk]))] = np.array([object()] * len(arrays[yk]), dtype=object)
    elif fault == "lengths differ":
        arrays[yk] = arrays[yk][:-1]
    elif fault == "inputs of rank 2":
        arrays[xk] = arrays[xk].reshape(len(arrays[xk]), -1)
    elif fault == "missing array":
        del arrays[draw(st.sampled_from(sorted(arrays)))]
    elif fault == "string inputs":
        arrays[xk] = arrays[xk].astype(str)
    elif fault == "NaN input":
        arrays[xk] = arrays[xk].copy()
        arrays[xk][row, 0, 0] = np.nan
    cut = draw(st.floats(0.05, 0.95)) if fault == "truncated file" else None
    return fault, arrays, cut


def _check_bad_npz(case) -> None:
    fault, arrays, cut = case
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "bad.npz")
        np.savez(path, allow_pickle=True, **arrays) if fault == "object array" else np.savez(path, **arrays)
        if cut is not None:
            data = open(path, "rb").read()
            with open(path, "wb") as f:
                f.write(data[:max(1, int(len(data) * cut))])
        workdir = os.path.join(tmp, "run")
        code, err = _run_cli(["run", "vision/digits_mlp", "--workdir", workdir, f"--config.data.name=npz:{path}",
                              "--config.data.batch_size=8", "--config.data.eval_batch_size=8"])
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 2 and len(lines) == 1 and path in lines[0], (fault, err)
        assert not os.path.exists(workdir), (fault, os.listdir(workdir))


@settings(max_examples=20, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(_bad_npz())
def test_a_bad_npz_file_is_exit_2_one_line_naming_the_file(case):
    _check_bad_npz(case)


@pytest.mark.slow
@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(_bad_npz())
def test_a_bad_npz_file_full_search(case):
    _check_bad_npz(case)


def test_labels_are_checked_against_the_traced_output_width(tmp_path):
    """digits_mlp has no model.num_classes: the width comes from the traced model (its last feature)."""
    x = np.random.default_rng(0).random((40, 8, 8)).astype(np.float32)
    y = np.arange(40) % 12
    np.savez(tmp_path / "d.npz", x_train=x, y_train=y, x_test=x[:8], y_test=y[:8] % 10)
    workdir = str(tmp_path / "run")
    code, err = _run_cli(["run", "vision/digits_mlp", "--workdir", workdir, f"--config.data.name=npz:{tmp_path}/d.npz",
                          "--config.data.batch_size=8", "--config.data.eval_batch_size=8"])
    assert code == 2 and "train labels run from 0 to 11, outside [0, 10)" in err, err
    assert "--config.model.features=(256,256,12)" in err and not os.path.exists(workdir)


def test_eval_of_a_missing_or_file_workdir_says_so(tmp_path):
    code, err = _run_cli(["eval", "--workdir", str(tmp_path / "missing")])
    assert code == 2 and "does not exist" in err and len(err.strip().splitlines()) == 1, err
    (tmp_path / "afile").write_text("x")
    code, err = _run_cli(["eval", "--workdir", str(tmp_path / "afile")])
    assert code == 2 and "is a file, not a run directory" in err, err


def test_a_workdir_that_is_a_file_is_named(tmp_path):
    (tmp_path / "afile").write_text("x")
    code, err = _run_cli(["run", "vision/digits_mlp", "--workdir", str(tmp_path / "afile")])
    assert code == 2 and "is a file, not a directory" in err and len(err.strip().splitlines()) == 1, err
    assert (tmp_path / "afile").read_text() == "x"
