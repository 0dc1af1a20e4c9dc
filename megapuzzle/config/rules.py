"""Declarative validation of config sections: a field states its rule in its type, a rule that
ties several fields is one named function, and one `__post_init__` (Section's) applies them all.

    @dataclass(frozen=True)
    class GKDConfig(Section):
        SECTION = "gkd"
        CHECKS = (lr_schedule, ...)
        lr: Annotated[float, Number(gt=0)] = 1e-4
        '''Peak learning rate.'''

Every failure is a UserError naming `section.field`, the value, and what it must be. Numbers may
arrive as strings (PyYAML reads `3e-4`, with no dot, as a string) and are converted. Optional
fields (`X | None`) accept None. Torch-free: configs load on a login node in milliseconds.
"""

from __future__ import annotations

import abc
import dataclasses
import typing
from typing import Any, Callable, ClassVar

from megapuzzle.errors import UserError


class Rule(abc.ABC):
    """One field's constraint: `apply` returns the (possibly converted) value or raises."""

    @abc.abstractmethod
    def apply(self, value: Any, where: str, optional: bool) -> Any:
        """The value to store (converted where the rule converts), or a one-line UserError."""


def _omitted(optional: bool) -> str:
    return " or omitted" if optional else ""


@dataclasses.dataclass(frozen=True)
class Number(Rule):
    """A real number within the given bounds (ints and numeric strings are converted to float)."""

    gt: float | None = None
    ge: float | None = None
    lt: float | None = None
    le: float | None = None

    def bounds(self) -> str:
        lo = f"> {self.gt:g}" if self.gt is not None else f">= {self.ge:g}" if self.ge is not None else ""
        hi = f"< {self.lt:g}" if self.lt is not None else f"<= {self.le:g}" if self.le is not None else ""
        if lo and hi:
            return f" in {'(' if self.gt is not None else '['}{(self.gt if self.gt is not None else self.ge):g}, " \
                   f"{(self.lt if self.lt is not None else self.le):g}{')' if self.lt is not None else ']'}"
        return f" {lo or hi}" if lo or hi else ""

    def apply(self, value, where, optional):
        try:
            if isinstance(value, bool):
                raise TypeError
            v = float(value)
        except (TypeError, ValueError):
            raise UserError(f"{where} must be a number{self.bounds()}{_omitted(optional)}, got {value!r}") from None
        if ((self.gt is not None and not v > self.gt) or (self.ge is not None and not v >= self.ge)
                or (self.lt is not None and not v < self.lt) or (self.le is not None and not v <= self.le)):
            raise UserError(f"{where} must be{self.bounds()}{_omitted(optional)}, got {value!r}")
        return v


@dataclasses.dataclass(frozen=True)
class Integer(Rule):
    """An int (not a bool) >= `ge`."""

    ge: int = 1

    def apply(self, value, where, optional):
        if not isinstance(value, int) or isinstance(value, bool) or value < self.ge:
            raise UserError(f"{where} must be an integer >= {self.ge}{_omitted(optional)}, got {value!r}")
        return value


@dataclasses.dataclass(frozen=True)
class Integers(Rule):
    """A non-empty list of ints >= `ge` (a single int is a list of one), kept as a tuple;
    `canonical` sorts it and drops repeats."""

    ge: int = 1
    canonical: bool = False

    def apply(self, value, where, optional):
        vals = (value,) if isinstance(value, int) else value
        if (not isinstance(vals, (list, tuple)) or not vals
                or any(not isinstance(v, int) or isinstance(v, bool) or v < self.ge for v in vals)):
            raise UserError(f"{where} must be a non-empty list of integers >= {self.ge}{_omitted(optional)}, "
                            f"got {value!r}")
        return tuple(sorted(set(vals))) if self.canonical else tuple(vals)


@dataclasses.dataclass(frozen=True)
class OneOf(Rule):
    """One of a fixed set of values."""

    options: tuple

    def apply(self, value, where, optional):
        if value not in self.options:
            names = [str(o) for o in self.options]
            listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]
            raise UserError(f"{where} {value!r} unknown; use {listed}" + (", or omit it" if optional else ""))
        return value


class Flag(Rule):
    """true or false (YAML booleans; not 0/1 or strings)."""

    def apply(self, value, where, optional):
        if not isinstance(value, bool):
            raise UserError(f"{where} must be true or false, got {value!r}")
        return value


@dataclasses.dataclass(frozen=True)
class Convert(Rule):
    """A value normalised by a function that raises UserError/ValueError on bad input."""

    fn: Callable[[Any], Any]
    expects: str

    def apply(self, value, where, optional):
        try:
            return self.fn(value)
        except (TypeError, ValueError) as e:
            raise UserError(f"{where} must be {self.expects}, got {value!r} ({e})") from None


def _rule_of(hint) -> tuple[Rule | None, bool]:
    """(the Annotated rule, whether None is allowed) of a resolved type hint."""
    optional = False
    if typing.get_origin(hint) in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        args = typing.get_args(hint)
        optional = type(None) in args
        hint = next((a for a in args if a is not type(None)), hint)
    if typing.get_origin(hint) is typing.Annotated:
        return next((m for m in hint.__metadata__ if isinstance(m, Rule)), None), optional
    return None, optional


_HINTS: dict[type, dict[str, tuple[Rule | None, bool]]] = {}


def field_rules(cls: type) -> dict[str, tuple[Rule | None, bool]]:
    """field name -> (rule, optional), resolved once per class."""
    if cls not in _HINTS:
        hints = typing.get_type_hints(cls, include_extras=True)  # each class in its own module's globals
        _HINTS[cls] = {f.name: _rule_of(hints[f.name]) for f in dataclasses.fields(cls)}
    return _HINTS[cls]


class Section:
    """Mixin for a frozen dataclass config section: validates every field's rule, then CHECKS."""

    SECTION: ClassVar[str] = ""
    CHECKS: ClassVar[tuple[Callable[[Any], None], ...]] = ()

    def __post_init__(self):
        for name, (rule, optional) in field_rules(type(self)).items():
            value = getattr(self, name)
            if rule is None or (value is None and optional):
                continue
            new = rule.apply(value, f"{self.SECTION}.{name}", optional)
            if new is not value:
                object.__setattr__(self, name, new)
        for check in self.CHECKS:
            check(self)


# ----------------------------------------------------------------------------- shared checks

def lr_schedule(cfg) -> None:
    """lr > 0, 0 <= min_lr <= lr (a cosine that ends above its peak is a typo)."""
    if not 0 <= cfg.min_lr <= cfg.lr:
        raise UserError(f"{cfg.SECTION}.lr must be > 0 and 0 <= {cfg.SECTION}.min_lr <= lr "
                        f"(got lr={cfg.lr}, min_lr={cfg.min_lr})")


DTYPES = ("auto", "float32", "bfloat16")
"""Parameter dtypes a stage trains or runs in: auto = bf16 on a GPU, fp32 on CPU."""
FP8_RECIPES = ("delayed", "current")
"""TransformerEngine FP8 scaling: delayed (amax history) or current (per tensor)."""
