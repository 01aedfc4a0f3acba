"""Typed value checks shared by every configuration surface: run configs (clipmech.train.config),
quickstart options, an experiment's [launch] and [analysis] tables.

Types: "bool", "int", "float" (ints accepted), "str", "list[str]", "list[int]"; a trailing "?" allows
None (unset). Rules: ">0", ">=N" (any number N), "0..1", "0..1)" (upper bound excluded) or a tuple
of choices.
A value that fails raises clipmech.errors.ConfigError "NAME = value ...; it must be ..." (exit 2).
"""
from __future__ import annotations

import math
import re
from typing import Any, Iterable

import torch

from clipmech.errors import ConfigError
from clipmech.utils import closest_names

_EXAMPLES = {"bool": "true or false", "int": "a whole number", "float": "a number", "str": "a quoted string",
             "list[str]": 'a list of strings, e.g. ["banana", "axe"]', "list[int]": "a list of whole numbers, e.g. [1, 2]"}
_RULES = {">0": (lambda v: v > 0, "> 0"), "0..1": (lambda v: 0 <= v <= 1, "in [0, 1]"),
          "0..1)": (lambda v: 0 <= v < 1, "in [0, 1)")}


def _rule(rule: str) -> tuple[Any, str]:
    """(test, text) of a range rule; ">=N" for any number N."""
    if rule.startswith(">="):
        bound = float(rule[2:])
        return (lambda v: v >= bound), f">= {rule[2:]}"
    return _RULES[rule]


def has_type(value: Any, kind: str) -> bool:
    """Whether `value` has the schema type `kind` ("bool", "int", "float", "str", "list[...]"); bools are not ints."""
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "float":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == "str":
        return isinstance(value, str)
    if kind.startswith("list["):
        return isinstance(value, list) and all(has_type(v, kind[5:-1]) for v in value)
    raise AssertionError(kind)


def check_typed(name: str, value: Any, kind: str, rule: Any = None) -> None:
    """Raise ConfigError "NAME = value ..." unless `value` has type `kind` and obeys `rule` (SCHEMA's
    notation); shared by the run config and other typed options (e.g. the quickstart's)."""
    optional = kind.endswith("?")
    kind = kind.rstrip("?")
    if kind == "any" or (optional and value is None):
        return
    where = f"{name} = {value!r}"
    if not has_type(value, kind):
        unset = " (or leave it out)" if optional else ""
        got = type(value).__name__
        raise ConfigError(f"{where} is {'an' if got[0] in 'aeiou' else 'a'} {got}; it must be {_EXAMPLES[kind]}{unset}")
    if kind == "float" and not math.isfinite(value):
        raise ConfigError(f"{where} is not a finite number")
    if isinstance(rule, tuple) and value not in rule:
        raise ConfigError(f"{where}; choose one of {', '.join(rule)}")
    if isinstance(rule, str):
        ok, text = _rule(rule)
        if not ok(value):
            raise ConfigError(f"{where} is out of range; it must be {text}")


def check_keys(where: str, given: Iterable[str], valid: Iterable[str], what: str = "key") -> None:
    """ConfigError "WHERE: unknown key 'x'; closest valid: 'y', ... (all valid: ...)" for the first
    name of `given` not in `valid`, so a misspelt key never silently falls back to a default."""
    valid = sorted(valid)
    for key in sorted(set(given) - set(valid)):
        near = ", ".join(repr(v) for v in closest_names(key, valid))
        raise ConfigError(f"{where}: unknown {what} {key!r}; closest valid: {near} (all valid: {', '.join(valid)})")


def check_device(name: str, device: str, here: bool = True) -> None:
    """ConfigError unless `device` is auto, cpu, cuda or cuda:N and, when it runs `here`, this machine
    has that CUDA device (a SLURM job's node is not this machine: here=False skips that)."""
    if device not in ("auto", "cpu", "cuda") and not re.fullmatch(r"cuda:\d+", device):
        raise ConfigError(f"{name} = {device!r}; choose one of auto, cpu, cuda, cuda:N")
    if here and device.startswith("cuda"):
        index = int(device.partition(":")[2] or 0)
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if index >= count:
            raise ConfigError(f"{name} = {device!r} but this machine has {count or 'no usable'} CUDA "
                              f"GPU{'s' if count != 1 else ''}; use --device cpu (or auto), or run where the GPU is")
