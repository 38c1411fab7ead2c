"""Frozen dataclasses as the one schema of ``routes.yaml``: validation.

The config types in ``types.py`` are plain frozen dataclasses. Their type hints, defaults,
``Annotated`` constraints and ``doc`` metadata drive both the validation here (which collects
*every* problem with its YAML path, never stopping at the first) and the JSON Schema export
(``daarion-gateway schema``). There is no second description of the format to drift apart.

Supported hints: ``str``, ``int``, ``float``, ``bool``, ``Literal[...]``, ``X | None``,
``tuple[X, ...]``, ``Mapping[str, X]``, nested dataclasses, and ``Annotated[X, Range | Pattern |
MinItems]``. A dataclass with a ``__shorthand__`` class attribute also accepts a bare string,
meaning ``{<shorthand>: <string>}`` (``nodes: [noda1]`` for ``nodes: [{node: noda1}]``).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal, TypeVar, get_args, get_origin, get_type_hints

import yaml

from .yamlsource import ENV_LIKE, LineLoader, substitute_env

T = TypeVar("T")
Path = tuple[str | int, ...]


@dataclass(frozen=True, slots=True)
class Range:
    """Inclusive bounds for a number (``gt`` for an exclusive lower bound)."""

    min: float | None = None
    max: float | None = None
    gt: float | None = None


@dataclass(frozen=True, slots=True)
class Pattern:
    """A regular expression a string must match in full; ``hint`` says it in words."""

    regex: str
    hint: str


@dataclass(frozen=True, slots=True)
class MinItems:
    n: int


@dataclass(frozen=True, slots=True)
class Check:
    """A test a regular expression cannot say (``ok(value)``), after any ``Pattern``; its
    message is ``hint``. The JSON Schema shows the patterns only."""

    ok: Any  # Callable[[Any], bool]; Any keeps the dataclass hashable and simple
    hint: str


@dataclass(frozen=True, slots=True)
class Problem:
    path: str
    message: str
    line: int | None = None

    def __str__(self) -> str:
        where = f"{self.path or '(top level)'}"
        if self.line is not None:
            where += f" (line {self.line})"
        return f"{where}: {self.message}"


def doc(
    text: str,
    default: Any = dataclasses.MISSING,
    *,
    factory: Any = dataclasses.MISSING,
    fallback: Any = dataclasses.MISSING,
) -> Any:
    """A dataclass field with a description for the JSON Schema. ``fallback``: the built-in
    value a layered setting (default ``None``: unset) takes when no layer sets it; the
    description and the JSON Schema's ``default`` both show it."""
    if isinstance(default, (dict, list)):
        raise TypeError("mutable default")  # pragma: no cover - programming error
    metadata: dict[str, Any] = {"doc": text}
    if fallback is not dataclasses.MISSING:
        text = f"{text.removesuffix('.')} (default {_shown(fallback)})."
        metadata = {"doc": text, "fallback": fallback}
    if factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def _shown(value: Any) -> str:
    """A default as routes.yaml would write it (true, 0.5, 30, /health)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def format_path(path: Path) -> str:
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else part
    return out


class _Invalid:
    """Marks a value that failed validation (its problem is already recorded)."""


INVALID: Final = _Invalid()


class Converter:
    """Validates plain data against a type hint, recording problems instead of raising."""

    def __init__(self, env: Mapping[str, str], lines: Mapping[int, Mapping[Any, int]]) -> None:
        self.env = env
        self.lines = lines
        self.problems: list[Problem] = []
        self.path_lines: dict[str, int] = {}

    def problem(self, path: Path, message: str, line: int | None) -> _Invalid:
        self.problems.append(Problem(format_path(path), message, line))
        return INVALID

    def convert(self, hint: Any, value: Any, path: Path = (), line: int | None = None) -> Any:
        if line is not None:
            self.path_lines.setdefault(format_path(path), line)
        origin = get_origin(hint)
        if origin is typing.Annotated:
            base, *constraints = get_args(hint)
            result = self.convert(base, value, path, line)
            if result is not INVALID:
                for constraint in constraints:
                    message = _check(constraint, result)
                    if message:
                        return self.problem(path, message, line)
            return result
        if origin in (typing.Union, types.UnionType):
            return self._union(hint, value, path, line)
        if isinstance(value, str) and (
            hint in (int, float, bool) or (origin is Literal and ENV_LIKE.search(value))
        ):
            value = self._env_scalar(value, path, line, as_yaml=origin is not Literal)
            if value is INVALID:
                return INVALID
        if origin is Literal:
            choices = get_args(hint)
            if value in choices and type(value) is type(choices[0]):
                return value
            return self.problem(path, f"must be one of {', '.join(map(str, choices))}", line)
        if origin is tuple:
            return self._sequence(get_args(hint)[0], value, path, line)
        if origin in (Mapping, dict, typing.Mapping):
            key_hint, item_hint = get_args(hint)
            return self._mapping(key_hint, item_hint, value, path, line)
        if dataclasses.is_dataclass(hint):
            return self._dataclass(typing.cast("type[Any]", hint), value, path, line)
        return self._scalar(hint, value, path, line)

    def _env_scalar(self, value: str, path: Path, line: int | None, *, as_yaml: bool) -> Any:
        """A string where a number, boolean or choice goes, ``${VAR}`` substituted. For a
        number or a boolean the text is then read as YAML reads it unquoted, whether or not
        it held a variable: ``port: "7001"`` is ``port: 7001``, as ``port: "${PORT:-7001}"``
        is. A choice keeps the text (``min_version: "1.3"`` is a string, not 1.3)."""
        text, missing = substitute_env(value, self.env)
        if missing:
            return self.problem(path, _missing_env(missing, path), line)
        if not as_yaml:
            return text
        try:
            return yaml.safe_load(text) if text.strip() else text
        except yaml.YAMLError:
            return text

    def _scalar(self, hint: Any, value: Any, path: Path, line: int | None) -> Any:
        if hint is str:
            if not isinstance(value, str):
                return self.problem(path, f"must be a string, not {_kind(value)}", line)
            text, missing = substitute_env(value, self.env)
            if missing:
                return self.problem(path, _missing_env(missing, path), line)
            return text
        if hint is bool:
            if isinstance(value, bool):
                return value
            return self.problem(path, f"must be true or false, not {_kind(value)}", line)
        if hint is int:
            if isinstance(value, int) and not isinstance(value, bool):
                return value
            return self.problem(path, f"must be an integer, not {_kind(value)}", line)
        if hint is float:
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return float(value)
            return self.problem(path, f"must be a number, not {_kind(value)}", line)
        raise TypeError(f"unsupported type hint {hint!r}")  # pragma: no cover

    def _union(self, hint: Any, value: Any, path: Path, line: int | None) -> Any:
        options = [a for a in get_args(hint) if a is not type(None)]
        if value is None and len(options) < len(get_args(hint)):
            return None
        for option in options:
            trial = Converter(self.env, self.lines)
            result = trial.convert(option, value, path, line)
            if result is not INVALID:
                self.path_lines.update(trial.path_lines)
                return result
        matching = [o for o in options if _kind_fits(o, value)]
        if len(options) == 1 or len(matching) == 1:
            # Report the problems of the one form this value was evidently meant as.
            return self.convert((matching or options)[0], value, path, line)
        names = " or ".join(_name(o) for o in options)
        return self.problem(path, f"must be {names}, not {_kind(value)}", line)

    def _sequence(self, item: Any, value: Any, path: Path, line: int | None) -> Any:
        if not isinstance(value, list):
            return self.problem(path, f"must be a list, not {_kind(value)}", line)
        where = self.lines.get(id(value), {})
        items = [self.convert(item, v, (*path, i), where.get(i, line)) for i, v in enumerate(value)]
        if any(v is INVALID for v in items):
            return INVALID
        return tuple(items)

    def _mapping(self, key_hint: Any, item: Any, value: Any, path: Path, line: int | None) -> Any:
        if not isinstance(value, dict):
            return self.problem(path, f"must be a mapping, not {_kind(value)}", line)
        where = self.lines.get(id(value), {})
        out: dict[str, Any] = {}
        ok = True
        for key, v in value.items():
            key_line = where.get(key, line)
            if not isinstance(key, str):
                self.problem((*path, str(key)), "keys must be strings", key_line)
                ok = False
                continue
            if self.convert(key_hint, key, (*path, key), key_line) is INVALID:
                ok = False
                # Its value's own problems too, with the rest (else fixing the name shows
                # them only then).
                self.convert(item, v, (*path, key), key_line)
                continue
            out[key] = self.convert(item, v, (*path, key), key_line)
            ok = ok and out[key] is not INVALID
        return types.MappingProxyType(out) if ok else INVALID

    def _dataclass(self, cls: type[Any], value: Any, path: Path, line: int | None) -> Any:
        shorthand = getattr(cls, "__shorthand__", None)
        if shorthand and isinstance(value, str):
            value = {shorthand: value}
        if value is None:
            value = {}
        if not isinstance(value, dict):
            return self.problem(path, f"must be a mapping, not {_kind(value)}", line)
        where = self.lines.get(id(value), {})
        hints = get_type_hints(cls, include_extras=True)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        ok = True
        for key in value:
            if key not in fields:
                close = difflib.get_close_matches(str(key), list(fields), n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                self.problem((*path, str(key)), f"unknown key{hint}", where.get(key, line))
                ok = False
        kwargs: dict[str, Any] = {}
        for name, f in fields.items():
            if name in value:
                kwargs[name] = self.convert(
                    hints[name], value[name], (*path, name), where.get(name, line)
                )
                ok = ok and kwargs[name] is not INVALID
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                self.problem(path, f"missing required key '{name}'", line)
                ok = False
        return cls(**kwargs) if ok else INVALID


def _check(constraint: Any, value: Any) -> str | None:
    if isinstance(constraint, Range):
        if isinstance(value, float) and not math.isfinite(value):  # .nan passes every bound
            return f"must be a finite number, not {value}"
        if constraint.min is not None and value < constraint.min:
            return f"must be at least {constraint.min:g}, not {value}"
        if constraint.max is not None and value > constraint.max:
            return f"must be at most {constraint.max:g}, not {value}"
        if constraint.gt is not None and value <= constraint.gt:
            return f"must be greater than {constraint.gt:g}, not {value}"
    elif isinstance(constraint, Pattern):
        if not re.fullmatch(constraint.regex, value):
            return f"{value!r} is not {constraint.hint}"
    elif isinstance(constraint, Check):
        if not constraint.ok(value):
            return f"{value!r} is not {constraint.hint}"
    elif isinstance(constraint, MinItems) and len(value) < constraint.n:
        return f"must have at least {constraint.n} item{'s' if constraint.n > 1 else ''}"
    return None


def _missing_env(names: list[str], path: Path = ()) -> str:
    listed = ", ".join(names)
    if path and path[-1] == "secret":
        # A secret has no sensible default: say what it is instead.
        return (
            f"environment variable {listed} is not set: it is the secret the tokens are signed "
            "with (auth-service's JWT_SECRET, at least 32 bytes); set it in the environment "
            "or .env"
        )
    return (
        f"environment variable {listed} is not set (write ${{{names[0]}:-default}} to default it)"
    )


def _kind(value: Any) -> str:
    if value is None:
        return "empty"
    return {
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: f"the string {value!r}" if isinstance(value, str) and len(value) < 40 else "a string",
        list: "a list",
        dict: "a mapping",
    }.get(type(value), type(value).__name__)


def _kind_fits(hint: Any, value: Any) -> bool:
    """Whether ``value`` has the YAML kind (mapping, list, scalar) that ``hint`` reads."""
    if get_origin(hint) is typing.Annotated:
        hint = get_args(hint)[0]
    if get_origin(hint) is tuple:
        return isinstance(value, list)
    if dataclasses.is_dataclass(hint):
        return isinstance(value, dict) or (
            isinstance(value, str) and getattr(hint, "__shorthand__", None) is not None
        )
    return not isinstance(value, (list, dict))


def _name(hint: Any) -> str:
    origin = get_origin(hint)
    if origin is typing.Annotated:
        return _name(get_args(hint)[0])
    if origin is tuple:
        return "a list"
    if dataclasses.is_dataclass(hint):
        return "a mapping"
    return {str: "a string", int: "an integer", float: "a number", bool: "a boolean"}.get(
        hint, str(hint)
    )


def validate(
    hint: type[T], data: Any, env: Mapping[str, str], loader: LineLoader
) -> tuple[T | None, Converter]:
    """Convert ``data`` to ``hint``; on failure return ``None`` (the problems are in the
    returned converter)."""
    conv = Converter(env, loader.lines)
    for container, key, line in loader.duplicates:
        path = _path_of(container, data) or ()
        conv.problem((*path, str(key)), "duplicate key", line)
    result = conv.convert(hint, data, (), 1)
    if result is INVALID or conv.problems:
        return None, conv
    return typing.cast("T", result), conv


def _path_of(target: int, data: Any, path: Path = ()) -> Path | None:
    """The path of the container whose id is ``target`` (for duplicate-key reports)."""
    if id(data) == target:
        return path
    items: Any = ()
    if isinstance(data, dict):
        items = ((str(k), v) for k, v in data.items())
    elif isinstance(data, list):
        items = enumerate(data)
    for key, value in items:
        found = _path_of(target, value, (*path, key))
        if found is not None:
            return found
    return None
