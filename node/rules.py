"""The routing condition language: declarative TOML tables, compiled once, never eval'd.

A condition table maps DICOM keywords to tests; several keys in one table must all
hold. A bare value means equals, a list means one of, and a table names operators:

    Modality = "CT"
    Modality = ["CT", "PT"]
    SeriesDescription = { regex = "thorax|chest", ignore_case = true }
    BodyPartExamined = { in = ["chest", "thorax"], ignore_case = true }
    SliceThickness = { ge = 0.5, le = 3 }
    ImageType = { contains = "AXIAL" }
    ContrastBolusAgent = { exists = false }
    SourceAddress = { network = "10.20.0.0/16" }
    BodyPartExamined = { equals = "CHEST", if_missing = true }

Composition: ``all = [...]``, ``any = [...]``, ``not = {...}``; over the series of a
study: ``has_series = {...}`` and ``no_series = {...}``.

Semantics:
- a missing (or empty) attribute never raises; the test fails, unless ``if_missing``
  gives the result to use instead;
- on a multi-valued attribute, equals, one-of, regex and ranges hold if any value does;
  ``contains`` holds if the values include every operand;
- numbers compare as numbers when both sides are numeric ("3.0" equals 3), else as
  stripped strings; regex uses search (anchor with ^ and $ for a whole-value match).

Besides DICOM keywords, conditions may use CallingAETitle, CalledAETitle, SourceAddress
(how the series arrived) and NumberOfInstances (instances received in the series).
"""

from __future__ import annotations

import difflib
import ipaddress
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial, total_ordering
from typing import Any

from pydicom.datadict import keyword_dict

PSEUDO_KEYWORDS = frozenset({"CallingAETitle", "CalledAETitle", "SourceAddress",
                             "NumberOfInstances"})
_OPERATORS = frozenset({"equals", "in", "regex", "ignore_case", "gt", "ge", "lt", "le",
                        "exists", "contains", "network", "if_missing"})
_COMBINATORS = frozenset({"all", "any", "not", "has_series", "no_series"})

Attributes = Mapping[str, Any]


class RuleError(ValueError):
    """A condition table that cannot be compiled; the message names its path."""


@dataclass(frozen=True)
class Subject:
    """What a condition looks at: one series' attributes, and its study's other series."""

    attributes: Attributes
    study_series: tuple[Attributes, ...] = ()


@dataclass(frozen=True)
class Outcome:
    ok: bool
    reason: str


class Condition:
    def evaluate(self, subject: Subject) -> Outcome:
        raise NotImplementedError


@dataclass(frozen=True)
class Always(Condition):
    def evaluate(self, subject: Subject) -> Outcome:
        return Outcome(True, "no conditions")


@dataclass(frozen=True)
class All(Condition):
    children: tuple[Condition, ...]

    def evaluate(self, subject: Subject) -> Outcome:
        reasons = []
        for child in self.children:
            out = child.evaluate(subject)
            if not out.ok:
                return out
            reasons.append(out.reason)
        return Outcome(True, "; ".join(reasons))


@dataclass(frozen=True)
class AnyOf(Condition):
    children: tuple[Condition, ...]

    def evaluate(self, subject: Subject) -> Outcome:
        reasons = []
        for child in self.children:
            out = child.evaluate(subject)
            if out.ok:
                return out
            reasons.append(out.reason)
        return Outcome(False, "none of: " + " | ".join(reasons))


@dataclass(frozen=True)
class Not(Condition):
    child: Condition

    def evaluate(self, subject: Subject) -> Outcome:
        out = self.child.evaluate(subject)
        return Outcome(not out.ok, f"not ({out.reason})")


@dataclass(frozen=True)
class SeriesQuantifier(Condition):
    """has_series / no_series: a condition over the other series of the study."""

    child: Condition
    negate: bool

    def evaluate(self, subject: Subject) -> Outcome:
        for attrs in subject.study_series:
            out = self.child.evaluate(Subject(attrs, subject.study_series))
            if out.ok:
                label = _series_label(attrs)
                if self.negate:
                    return Outcome(False, f"series {label} should not exist: {out.reason}")
                return Outcome(True, f"series {label}: {out.reason}")
        if self.negate:
            return Outcome(True, "no series matches the no_series condition")
        return Outcome(False, f"no series in the study matches ({len(subject.study_series)} "
                              f"series looked at)")


def _series_label(attrs: Attributes) -> str:
    number = attrs.get("SeriesNumber")
    modality = attrs.get("Modality") or "?"
    return f"#{number} {modality}" if number is not None else str(modality)


def values_of(value: Any) -> list[Any]:
    """An attribute value as a list of its values (empty when missing or empty)."""
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [v for v in value if v is not None and str(v).strip() != ""]
    return [] if str(value).strip() == "" else [value]


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _same(seen: Any, wanted: Any, fold: bool = False) -> bool:
    a, b = _number(seen), _number(wanted)
    if a is not None and b is not None:
        return a == b
    if fold:
        return str(seen).strip().casefold() == str(wanted).strip().casefold()
    return str(seen).strip() == str(wanted).strip()


def _show(values: Sequence[Any]) -> str:
    if len(values) == 1:
        return repr(values[0])
    return "[" + ", ".join(repr(v) for v in values) + "]"


@dataclass(frozen=True)
class Test(Condition):
    """One test of one attribute."""

    keyword: str
    describe: str                        # what was expected, e.g. "<= 3"
    check: Callable[[list[Any]], bool]
    if_missing: bool | None = None
    on_missing_only: bool = False        # exists = false

    def evaluate(self, subject: Subject) -> Outcome:
        values = values_of(subject.attributes.get(self.keyword))
        if not values:
            if self.on_missing_only:
                return Outcome(True, f"{self.keyword} is missing, as expected")
            if self.if_missing is not None:
                return Outcome(self.if_missing, f"{self.keyword} missing (if_missing = "
                               f"{str(self.if_missing).lower()})")
            return Outcome(False, f"{self.keyword} missing, expected {self.describe}")
        ok = self.check(values)
        verb = "" if ok else ", expected "
        tail = "" if ok else self.describe
        return Outcome(ok, f"{self.keyword} = {_show(values)}{verb}{tail}")


def _keyword(name: str, path: str) -> str:
    if name in keyword_dict or name in PSEUDO_KEYWORDS:
        return name
    pool = list(_COMBINATORS) + list(PSEUDO_KEYWORDS) + list(keyword_dict)
    close = difflib.get_close_matches(name, pool, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise RuleError(f"{path}: unknown DICOM keyword {name!r}{hint}")


def _scalar(value: Any, path: str) -> Any:
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return value
    raise RuleError(f"{path}: expected a string or number, got {value!r}")


def _regex(pattern: Any, ignore_case: bool, path: str) -> re.Pattern[str]:
    if not isinstance(pattern, str):
        raise RuleError(f"{path}: expected a regular expression string, got {pattern!r}")
    try:
        return re.compile(pattern, re.IGNORECASE if ignore_case else 0)
    except re.error as exc:
        raise RuleError(f"{path}: invalid regular expression {pattern!r}: {exc}") from None


def _operator_tests(keyword: str, table: dict[str, Any], path: str) -> list[Test]:
    unknown = set(table) - _OPERATORS
    if unknown:
        bad = sorted(unknown)[0]
        close = difflib.get_close_matches(bad, sorted(_OPERATORS), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise RuleError(f"{path}.{bad}: unknown operator{hint} (operators: "
                        f"{', '.join(sorted(_OPERATORS))})")
    if_missing = table.get("if_missing")
    if if_missing is not None and not isinstance(if_missing, bool):
        raise RuleError(f"{path}.if_missing: expected true or false, got {if_missing!r}")
    ignore_case = table.get("ignore_case", False)
    if not isinstance(ignore_case, bool):
        raise RuleError(f"{path}.ignore_case: expected true or false, got {ignore_case!r}")
    how = " (ignoring case)" if ignore_case else ""
    tests: list[Test] = []

    def add(describe: str, check: Callable[[list[Any]], bool], **kw: Any) -> None:
        tests.append(Test(keyword, describe, check, if_missing, **kw))

    if "equals" in table:
        wanted = _scalar(table["equals"], f"{path}.equals")
        add(repr(wanted) + how, partial(_any_equals, [wanted], ignore_case))
    if "in" in table:
        options = table["in"]
        if not isinstance(options, list) or not options:
            raise RuleError(f"{path}.in: expected a non-empty list, got {options!r}")
        opts = [_scalar(o, f"{path}.in") for o in options]
        add(f"one of {opts!r}{how}", partial(_any_equals, opts, ignore_case))
    if "regex" in table:
        rx = _regex(table["regex"], ignore_case, f"{path}.regex")
        add(f"to match /{rx.pattern}/{how}", partial(_any_regex, rx))
    bounds: dict[str, Any] = {op: table[op] for op in ("gt", "ge", "lt", "le") if op in table}
    if bounds:
        for op, bound in bounds.items():
            if _number(bound) is None:
                raise RuleError(f"{path}.{op}: expected a number, got {bound!r}")
        symbols = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}
        text = " and ".join(f"{symbols[op]} {bound}" for op, bound in bounds.items())
        add(text, partial(_any_in_range, bounds))
    if "exists" in table:
        exists = table["exists"]
        if not isinstance(exists, bool):
            raise RuleError(f"{path}.exists: expected true or false, got {exists!r}")
        if exists:
            add("to be present", _present)
        else:
            add("to be missing", _absent, on_missing_only=True)
    if "contains" in table:
        raw = table["contains"]
        if raw == []:
            raise RuleError(f"{path}.contains: expected a value or a non-empty list, got []")
        items = [_scalar(i, f"{path}.contains") for i in (raw if isinstance(raw, list) else [raw])]
        add(f"to contain {_show(items)}{how}", partial(_contains_all, items, ignore_case))
    if "network" in table:
        try:
            net = ipaddress.ip_network(str(table["network"]), strict=False)
        except ValueError:
            raise RuleError(f"{path}.network: expected an address or CIDR block, got "
                            f"{table['network']!r}") from None
        add(f"an address in {net}", partial(_any_in_network, net))
    if not tests:
        raise RuleError(f"{path}: no test given (use one of: equals, in, regex, gt, ge, lt, "
                        f"le, exists, contains, network)")
    return tests


def _any_equals(options: list[Any], fold: bool, values: list[Any]) -> bool:
    return any(_same(v, o, fold) for v in values for o in options)


def _any_regex(rx: re.Pattern[str], values: list[Any]) -> bool:
    return any(rx.search(str(v)) for v in values)


def _any_in_range(bounds: dict[str, Any], values: list[Any]) -> bool:
    return any(_in_range(v, bounds) for v in values)


def _in_range(value: Any, bounds: dict[str, Any]) -> bool:
    number = _number(value)
    if number is None:
        return False
    compare = {"gt": number.__gt__, "ge": number.__ge__, "lt": number.__lt__,
               "le": number.__le__}
    return all(compare[op](float(bound)) for op, bound in bounds.items())


def _present(values: list[Any]) -> bool:
    return True


def _absent(values: list[Any]) -> bool:
    return False


def _contains_all(items: list[Any], fold: bool, values: list[Any]) -> bool:
    return all(any(_same(v, i, fold) for v in values) for i in items)


def _any_in_network(net: ipaddress.IPv4Network | ipaddress.IPv6Network,
                    values: list[Any]) -> bool:
    return any(_in_network(v, net) for v in values)


def _in_network(value: Any, net: ipaddress.IPv4Network | ipaddress.IPv6Network) -> bool:
    try:
        address = ipaddress.ip_address(str(value).strip())
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped      # dual-stack sockets report ::ffff:a.b.c.d
    return address in net


def compile_condition(spec: Any, path: str = "match") -> Condition:
    """Compile a condition table. Raises RuleError naming the offending path."""
    if not isinstance(spec, dict):
        raise RuleError(f"{path}: expected a table of conditions, got {spec!r}")
    children: list[Condition] = []
    for key, value in spec.items():
        where = f"{path}.{key}"
        if key in ("all", "any"):
            if not isinstance(value, list) or not value:
                raise RuleError(f"{where}: expected a non-empty list of condition tables")
            parts = tuple(compile_condition(v, f"{where}[{i}]") for i, v in enumerate(value))
            children.append(All(parts) if key == "all" else AnyOf(parts))
        elif key == "not":
            children.append(Not(compile_condition(value, where)))
        elif key in ("has_series", "no_series"):
            children.append(SeriesQuantifier(compile_condition(value, where),
                                             negate=key == "no_series"))
        else:
            keyword = _keyword(key, where)
            if isinstance(value, dict):
                children.extend(_operator_tests(keyword, value, where))
            elif isinstance(value, list):
                children.extend(_operator_tests(keyword, {"in": value}, where))
            else:
                children.extend(_operator_tests(keyword, {"equals": _scalar(value, where)},
                                                where))
    if not children:
        return Always()
    return children[0] if len(children) == 1 else All(tuple(children))


@total_ordering
class _Text:
    """A string sort key that can sort in reverse (for ``prefer = ["-Keyword"]``)."""

    def __init__(self, text: str, *, reverse: bool = False) -> None:
        self.text = text
        self.reverse = reverse

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Text) and self.text == other.text

    def __lt__(self, other: _Text) -> bool:
        return other.text < self.text if self.reverse else self.text < other.text

    def __hash__(self) -> int:
        return hash(self.text)


@dataclass(frozen=True)
class Selector:
    """Which series of a study a study-level route hands to its model.

    Candidates must satisfy ``where`` and have at least ``min_instances``; they are
    ordered by ``prefer`` (keywords, ``-`` for descending), then by SeriesNumber and
    SeriesInstanceUID, so the choice is deterministic.
    """

    where: Condition
    min_instances: int
    prefer: tuple[tuple[str, bool], ...]

    def choose(self, series: Sequence[Attributes]) -> tuple[Attributes | None, str]:
        candidates = []
        for attrs in series:
            ok = self.where.evaluate(Subject(attrs, tuple(series)))
            count = _number(attrs.get("NumberOfInstances")) or 0
            if ok.ok and count >= self.min_instances:
                candidates.append(attrs)
        if not candidates:
            return None, (f"no series satisfies select (min_instances {self.min_instances}) "
                          f"among {len(series)}")
        candidates.sort(key=self._key)
        best = candidates[0]
        return best, (f"selected series {_series_label(best)} of {len(candidates)} candidate(s)"
                      + (f" by {', '.join(('-' if d else '') + k for k, d in self.prefer)}"
                         if self.prefer else ""))

    def _key(self, attrs: Attributes) -> tuple[Any, ...]:
        parts: list[Any] = []
        for keyword, descending in self.prefer:
            values = values_of(attrs.get(keyword))
            number = _number(values[0]) if values else None
            if not values:
                parts.append((2, 0.0, _Text("")))                      # missing: last
            elif number is None:
                text = str(values[0]).strip()
                parts.append((1, 0.0, _Text(text, reverse=descending)))
            else:
                parts.append((0, -number if descending else number, _Text("")))
        number = _number(attrs.get("SeriesNumber"))
        parts.append(number if number is not None else math.inf)
        parts.append(str(attrs.get("SeriesInstanceUID", "")))
        return tuple(parts)


def compile_selector(spec: Any, path: str = "select") -> Selector:
    if not isinstance(spec, dict):
        raise RuleError(f"{path}: expected a table, got {spec!r}")
    unknown = set(spec) - {"where", "min_instances", "prefer"}
    if unknown:
        raise RuleError(f"{path}.{sorted(unknown)[0]}: unknown key (select takes where, "
                        f"min_instances, prefer)")
    where = compile_condition(spec.get("where", {}), f"{path}.where")
    minimum = spec.get("min_instances", 1)
    if not isinstance(minimum, int) or isinstance(minimum, bool) or minimum < 1:
        raise RuleError(f"{path}.min_instances: expected a whole number >= 1, got {minimum!r}")
    prefer_raw = spec.get("prefer", [])
    if isinstance(prefer_raw, str):
        prefer_raw = [prefer_raw]
    if not isinstance(prefer_raw, list):
        raise RuleError(f"{path}.prefer: expected a list of keywords, got {prefer_raw!r}")
    prefer = []
    for i, item in enumerate(prefer_raw):
        if not isinstance(item, str) or not item.lstrip("-"):
            raise RuleError(f"{path}.prefer[{i}]: expected a keyword, got {item!r}")
        prefer.append((_keyword(item.lstrip("-"), f"{path}.prefer[{i}]"), item.startswith("-")))
    return Selector(where, minimum, tuple(prefer))
