"""The JSON Schema (draft 2020-12) of the config types, for editors (``daarion-gateway
schema``). Generated from the same type hints the loader validates with."""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from collections.abc import Mapping
from typing import Any, Final, Literal, get_args, get_origin, get_type_hints

import yaml

from .validate import MinItems, Pattern, Range


def json_schema(hint: Any, description: str | None = None) -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of a type hint built from the kinds above."""
    schema = _schema(hint)
    if description:
        schema["description"] = description
    return schema


_ENV_STRING: Final[dict[str, Any]] = {"type": "string", "pattern": r"\$\{"}


# A number or boolean may also be quoted ("7001"): the loader reads the text as YAML reads a
# bare scalar, so the schema takes the strings PyYAML's own resolvers read as that type (a
# float field takes an integer too).
def _yaml_scalar(*tags: str) -> dict[str, Any]:
    patterns = sorted(
        {
            re.sub(r"\s+", "", regex.pattern)  # they are written in re.VERBOSE
            for resolvers in yaml.resolver.Resolver.yaml_implicit_resolvers.values()
            for tag, regex in resolvers
            if tag in tags
        }
    )
    alternatives = "|".join(p.removeprefix("^").removesuffix("$") for p in patterns)
    return {"type": "string", "pattern": rf"^\s*(?:{alternatives})\s*$"}


_QUOTED: Final[dict[Any, dict[str, Any]]] = {
    int: _yaml_scalar("tag:yaml.org,2002:int"),
    float: _yaml_scalar("tag:yaml.org,2002:int", "tag:yaml.org,2002:float"),
    bool: _yaml_scalar("tag:yaml.org,2002:bool"),
}


def _schema(hint: Any) -> dict[str, Any]:
    origin = get_origin(hint)
    if origin is typing.Annotated:
        base, *constraints = get_args(hint)
        schema = _schema(base)
        if base is str and any(isinstance(c, Pattern) for c in constraints):
            schema = {"anyOf": [schema, _ENV_STRING]}  # "${VAR}" is checked once substituted
        target = schema["anyOf"][0] if "anyOf" in schema else schema
        for c in constraints:
            if isinstance(c, Range):
                target.update(
                    {
                        k: v
                        for k, v in (
                            ("minimum", c.min),
                            ("maximum", c.max),
                            ("exclusiveMinimum", c.gt),
                        )
                        if v is not None
                    }
                )
            elif isinstance(c, Pattern):
                target["pattern"] = f"^(?:{c.regex})$"
            elif isinstance(c, MinItems):
                target["minItems"] = c.n
        return schema
    if origin in (typing.Union, types.UnionType):
        options = [_schema(a) for a in get_args(hint) if a is not type(None)]
        if type(None) in get_args(hint):
            options.append({"type": "null"})
        return {"anyOf": options}
    if origin is Literal:
        return {"enum": list(get_args(hint))}
    if origin is tuple:
        return {"type": "array", "items": _schema(get_args(hint)[0])}
    if origin in (Mapping, dict, typing.Mapping):
        key, item = get_args(hint)
        schema = {"type": "object", "additionalProperties": _schema(item)}
        key_schema = _schema(key)
        if "pattern" in key_schema:
            schema["propertyNames"] = {"pattern": key_schema["pattern"]}
        return schema
    if dataclasses.is_dataclass(hint):
        return _dataclass_schema(typing.cast("type[Any]", hint))
    simple = {str: "string", int: "integer", float: "number", bool: "boolean"}
    if hint is str:
        return {"type": "string"}
    if hint in simple:
        return {"anyOf": [{"type": simple[hint]}, _QUOTED[hint], _ENV_STRING]}
    raise TypeError(f"unsupported type hint {hint!r}")  # pragma: no cover


def _dataclass_schema(cls: type[Any]) -> dict[str, Any]:
    hints = get_type_hints(cls, include_extras=True)
    properties: dict[str, Any] = {}
    required: list[str] = []
    for f in dataclasses.fields(cls):
        prop = _schema(hints[f.name])
        if "doc" in f.metadata:
            prop["description"] = f.metadata["doc"]
        if "fallback" in f.metadata:
            prop["default"] = f.metadata["fallback"]  # what an unset layered key means
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            required.append(f.name)
        elif isinstance(f.default, (str, int, float, bool)):
            prop["default"] = f.default
        properties[f.name] = prop
    schema: dict[str, Any] = {
        "type": "object",
        "properties": properties,
        "additionalProperties": False,
    }
    if cls.__doc__ and not cls.__doc__.startswith(cls.__name__ + "("):
        schema["description"] = " ".join(cls.__doc__.split())
    if required:
        schema["required"] = required
    shorthand = getattr(cls, "__shorthand__", None)
    if shorthand:
        return {
            "anyOf": [{"type": "string", "description": f"short for {{{shorthand}: ...}}"}, schema]
        }
    return schema
