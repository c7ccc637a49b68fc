"""Config schema: each config key's type and domain, declared once, checked before a run directory is written.

A `Domain` says what values a key may take (an integer >= 1, a number in [0, 1), one of some names, a tuple of
positive sizes, ...). Declarations are `(pattern, Domain)` rules over dotted keys (`fnmatch` patterns, first
match wins): the engine's own (seed, train.*, mesh.* and every optimizer section, `engine_rules`) sit here and
next to their defaults (train/optim.py's `OPTIM_DOMAINS`); research/config_schema.py adds the experiments'
(model.dropout, data.batch_size, model.features, ...). A key no rule names keeps the type of its default
(`inferred`). `check` reports the first bad value as one line:

    model.dropout=1.5: expected a number in [0, 1) (a probability); fix: pass --config.model.dropout=0.1 (its
    default) or another value in that range

Example:
    >>> rules = [("model.dropout", probability()), ("*.batch_size", integer(1))]
    >>> check(config, rules, defaults=get_config())      # raises ConfigValueError naming the key
"""
from __future__ import annotations

import dataclasses
import fnmatch
import math
import numbers
from typing import Any, Sequence

import ml_collections
import numpy as np

from depthlab.train.rundir import flat_config

SEED_LIMIT = 2 ** 32   # seeds are uint32 (numpy, scikit-learn and jax.random.key all accept [0, 2**32))


class ConfigValueError(ValueError):
    """A config value outside its declared domain; `key` names it."""

    def __init__(self, message: str, key: str):
        super().__init__(message)
        self.key = key


@dataclasses.dataclass(frozen=True)
class Domain:
    """The values one key may take.

    kind: "int", "float" (ints accepted; NaN and inf are not), "bool", "str", "sizes" (an int or a tuple of
        ints, each in [low, high)), "tuple" (any tuple), or "any".
    low/high: bounds of a number (or of each size); `low_open` excludes low, `high_open` (default) excludes high.
    choices: the allowed values (for "str", or extra values of an "int" such as mesh.data=-1).
    optional: None is allowed too. note: why, in words ("a probability").
    """
    kind: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = True
    choices: tuple = ()
    optional: bool = False
    note: str = ""
    empty_ok: bool = False   # "sizes": () is allowed

    def describe(self) -> str:
        """"an integer >= 1", "a number in [0, 1)", "one of sgd, adam", ..."""
        if self.kind == "str" and self.choices:
            text = f"one of {', '.join(map(str, self.choices))}"
        else:
            noun = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string",
                    "sizes": "a tuple of integers", "tuple": "a tuple", "any": "any value"}[self.kind]
            text = noun + self._range_text(each=self.kind == "sizes")
            if self.kind == "int" and self.choices:
                text += f", or {', '.join(map(str, self.choices))}"
        if self.optional:
            text += ", or None"
        return text + (f" ({self.note})" if self.note else "")

    def _range_text(self, each: bool = False) -> str:
        low, high = self.low, self.high
        if low is None and high is None:
            return " (finite)" if self.kind == "float" else ""
        prefix = ", each" if each else ""
        if high is None:
            return f"{prefix} {'>' if self.low_open else '>='} {_num(low)}"
        if low is None:
            return f"{prefix} {'<' if self.high_open else '<='} {_num(high)}"
        return f"{prefix} in {'(' if self.low_open else '['}{_num(low)}, {_num(high)}{')' if self.high_open else ']'}"

    def accepts(self, value: Any) -> bool:
        if value is None:
            return self.optional or self.kind == "any"
        kind = self.kind
        if kind == "any":
            return True
        if kind == "bool":
            return isinstance(value, bool)
        if kind == "str":
            return isinstance(value, str) and (not self.choices or value in self.choices)
        if kind == "tuple":
            return isinstance(value, (tuple, list))
        if kind == "sizes":
            items = value if isinstance(value, (tuple, list)) else (value,)
            return (len(items) > 0 or self.empty_ok) and all(_is_int(v) and self._in_range(v) for v in items)
        if kind == "int":
            return _is_int(value) and (value in self.choices or self._in_range(value))
        if kind == "float":
            return (_is_number(value) and math.isfinite(float(value)) and self._in_range(float(value)))
        raise ValueError(f"unknown Domain kind {kind!r}")

    def _in_range(self, v) -> bool:
        if self.low is not None and (v <= self.low if self.low_open else v < self.low):
            return False
        return self.high is None or (v < self.high if self.high_open else v <= self.high)

    def fits(self, default: Any) -> bool:
        """Whether this domain is about values like `default` (a rule for counts does not apply to a tuple)."""
        if default is None:
            return True
        if self.kind in ("int", "float"):
            return _is_number(default) and (self.kind == "float" or _is_int(default))
        if self.kind == "sizes":
            return _is_int(default) or (isinstance(default, (tuple, list)) and all(_is_int(v) for v in default))
        if self.kind == "bool":
            return isinstance(default, bool)
        if self.kind == "str":
            return isinstance(default, str)
        if self.kind == "tuple":
            return isinstance(default, (tuple, list))
        return True


def _is_int(v) -> bool:
    """An int, or a numpy/JAX integer scalar (a study may set np.int64(8)); never a bool."""
    if isinstance(v, (bool, np.bool_)):
        return False
    return isinstance(v, numbers.Integral) or (np.ndim(v) == 0 and np.asarray(v).dtype.kind in "iu"
                                               if hasattr(v, "dtype") else False)


def _is_number(v) -> bool:
    """An int or float, or a numpy/JAX real scalar (np.float32(1e-3) from a grid of learning rates)."""
    if isinstance(v, (bool, np.bool_)):
        return False
    return isinstance(v, numbers.Real) or (np.ndim(v) == 0 and np.asarray(v).dtype.kind in "iuf"
                                           if hasattr(v, "dtype") else False)


def _num(x) -> str:
    if isinstance(x, float) and x.is_integer():
        x = int(x)
    return "2**32" if x == SEED_LIMIT else str(x)


# ---- the declarations' vocabulary ------------------------------------------------------------------------

def integer(low: int | None = None, high: int | None = None, *, also: Sequence[int] = (), optional: bool = False,
            note: str = "") -> Domain:
    """An int (not a bool) in [low, high) (either bound may be None), or one of `also`."""
    return Domain("int", low, high, choices=tuple(also), optional=optional, note=note)


def number(low: float | None = None, high: float | None = None, *, low_open: bool = False, high_open: bool = True,
           optional: bool = False, note: str = "") -> Domain:
    """A finite int or float in the interval (bounds as given)."""
    return Domain("float", low, high, low_open, high_open, optional=optional, note=note)


def positive(note: str = "", optional: bool = False) -> Domain:
    return number(0.0, low_open=True, note=note, optional=optional)


def probability(note: str = "a probability") -> Domain:
    """[0, 1): a dropout rate of 1 drops everything."""
    return number(0.0, 1.0, note=note)


def fraction(note: str = "") -> Domain:
    """[0, 1], both ends allowed."""
    return number(0.0, 1.0, high_open=False, note=note)


def seed() -> Domain:
    return integer(0, SEED_LIMIT, note="a seed")


def choice(*values: str, optional: bool = False) -> Domain:
    return Domain("str", choices=tuple(values), optional=optional)


def sizes(low: int = 1, note: str = "", empty_ok: bool = False) -> Domain:
    """An int or a non-empty tuple of ints, each >= low (layer widths, channels, shapes); () too if empty_ok."""
    return Domain("sizes", low, note=note, empty_ok=empty_ok)


def boolean() -> Domain:
    return Domain("bool")


def text() -> Domain:
    return Domain("str")


ANYTHING = Domain("any")


def inferred(default: Any) -> Domain:
    """The domain of a key no rule names: the type of its default; an int count (default >= 0) stays >= 0."""
    if default is None:
        return ANYTHING
    if isinstance(default, bool):
        return boolean()
    if isinstance(default, int):
        return integer(0) if default >= 0 else integer()
    if isinstance(default, float):
        return number()
    if isinstance(default, str):
        return text()
    if isinstance(default, (tuple, list)):
        return Domain("tuple")
    return ANYTHING


# ---- checking ----------------------------------------------------------------------------------------------

Rules = Sequence[tuple[str, Domain]]


def flat(config: Any, prefix: str = "") -> dict:
    """{"a.b.c": value} of a ConfigDict or dict (tuples and lists are values): rundir's `flat_config`."""
    return flat_config(config.to_dict() if isinstance(config, ml_collections.ConfigDict) else config, prefix)


def domain_of(key: str, rules: Rules, default: Any = None) -> tuple[Domain, str]:
    """(the domain of `key`, the pattern that declared it, or "inferred"): the first rule whose pattern matches
    the key and whose domain fits its default's type."""
    for pattern, domain in rules:
        if fnmatch.fnmatchcase(key, pattern) and domain.fits(default):
            return domain, pattern
    return inferred(default), "inferred"


def check(config: Any, rules: Rules, *, defaults: Any = None, prefix: str = "") -> None:
    """Raises ConfigValueError for the first value of `config` outside its domain (`domain_of`; `defaults`,
    the unmodified config, gives the types of keys no rule names). `prefix` is prepended to the keys
    ("optim" for an optimizer section checked alone)."""
    values = flat(config, f"{prefix}." if prefix else "")
    known = flat(defaults, f"{prefix}." if prefix else "") if defaults is not None else values
    for key, value in values.items():
        default = known.get(key, value)
        domain, _ = domain_of(key, rules, default)
        if not domain.accepts(value):
            raise ConfigValueError(error_text(key, value, domain, default), key)


def error_text(key: str, value: Any, domain: Domain, default: Any = None) -> str:
    """"KEY=VALUE: expected ...; fix: ..." (one line)."""
    shown = repr(value) if isinstance(value, str) else str(value)
    if default is not None and domain.accepts(default) and default != value:
        fix = f"pass --config.{key}={_cli(default)} (its default) or another value of that kind"
    else:
        fix = f"pass --config.{key}=VALUE with VALUE {domain.describe()}"
    return f"{key}={shown}: expected {domain.describe()}; fix: {fix}"


def _cli(value: Any) -> str:
    if isinstance(value, (tuple, list)):
        return "(" + ",".join(map(str, value)) + ("," if len(value) == 1 else "") + ")"
    return str(value)


# ---- the engine's declarations ------------------------------------------------------------------------------

OPTIM_SECTIONS = ("optim", "*.optim", "*_optim", "*.*_optim")   # config sections that hold an optimizer's keys


def engine_rules() -> list[tuple[str, Domain]]:
    """The rules for the keys the engine reads: seed, train.* (from train/loop.py's `TRAIN_AT_LEAST` and `TRAIN_CHOICES`),
    mesh.*, and every optimizer section (train/optim.py's `OPTIM_DOMAINS`)."""
    from depthlab.train import loop, optim

    rules: list[tuple[str, Domain]] = [("seed", seed()), ("*.seed", seed())]
    rules += [(f"train.{key}", integer(low)) for key, low in loop.TRAIN_AT_LEAST.items()]
    rules += [(f"train.{key}", choice(*valid)) for key, valid in loop.TRAIN_CHOICES.items()]
    rules += [("train.max_skipped_fraction", fraction("1 never stops a train.nonfinite=skip run"))]
    rules += [(f"mesh.{axis}", integer(1, also=(-1,), note="devices on that axis; -1: all remaining"))
              for axis in ("data", "fsdp", "tensor")]
    rules += [("mesh.strategy", choice("replicated", "fsdp")), ("mesh.fsdp_min_size", integer(0))]
    declared = {pattern for pattern, _ in rules}
    rules += [(f"train.{key}", inferred(default)) for key, default in loop.default_train_config().items()
              if f"train.{key}" not in declared]   # the flags and names: their default's type
    for section in OPTIM_SECTIONS:
        rules += [(f"{section}.{key}", domain) for key, domain in optim.OPTIM_DOMAINS.items()]
    return rules


def check_section(config: Any, domains: dict[str, Domain], prefix: str) -> None:
    """`check` of one section against {key: Domain} (make_optimizer's own check of an optimizer config)."""
    check(config, [(f"{prefix}.{k}", d) for k, d in domains.items()], prefix=prefix)
