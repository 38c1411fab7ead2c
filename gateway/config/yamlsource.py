"""Reading ``routes.yaml``: safe YAML with line numbers and duplicate keys noticed, and
``${VAR}`` / ``${VAR:-default}`` substitution from the environment."""

from __future__ import annotations

import re
import typing
from collections.abc import Mapping
from typing import Any

import yaml

ENV = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
ENV_LIKE = re.compile(r"\$\{")


def substitute_env(text: str, env: Mapping[str, str]) -> tuple[str, list[str]]:
    """Replace ``${VAR}`` and ``${VAR:-default}``; ``$$`` is a literal ``$``.

    Returns the new text and the names of unset variables that had no default.
    """
    missing: list[str] = []

    def repl(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name, default = m.group(1), m.group(2)
        value = env.get(name)
        if value is None or (value == "" and default is not None):
            if default is None:
                missing.append(name)
                return ""
            return default
        return value

    return ENV.sub(repl, text), missing


class LineLoader(yaml.SafeLoader):
    """A safe YAML loader that rejects duplicate keys and remembers line numbers.

    ``lines[id(container)]`` maps each key or index of a loaded dict or list to the
    1-based line where it appears, so that problems can name their line.
    """

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.lines: dict[int, dict[Any, int]] = {}
        self.keep: list[Any] = []  # keeps containers alive so that their ids stay unique
        self.duplicates: list[tuple[int, Any, int]] = []  # (container id, key, line)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        self.flatten_mapping(node)
        result: dict[Any, Any] = {}
        where: dict[Any, int] = {}
        for key_node, value_node in node.value:
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, typing.Hashable):
                raise yaml.constructor.ConstructorError(
                    None, None, "unhashable key", key_node.start_mark
                )
            line = key_node.start_mark.line + 1
            if key in where:
                self.duplicates.append((id(result), key, line))
            result[key] = self.construct_object(value_node, deep=True)
            where[key] = line
        self.lines[id(result)] = where
        self.keep.append(result)
        return result

    def construct_sequence(self, node: yaml.SequenceNode, deep: bool = False) -> list[Any]:
        result = [self.construct_object(child, deep=True) for child in node.value]
        self.lines[id(result)] = {
            i: child.start_mark.line + 1 for i, child in enumerate(node.value)
        }
        self.keep.append(result)
        return result


LineLoader.add_constructor("tag:yaml.org,2002:map", LineLoader.construct_mapping)
LineLoader.add_constructor("tag:yaml.org,2002:seq", LineLoader.construct_sequence)


def load_yaml(text: str) -> tuple[Any, LineLoader]:
    """Parse YAML safely; raises ``yaml.YAMLError`` for syntax errors."""
    loader = LineLoader(text)
    try:
        return loader.get_single_data(), loader
    finally:
        loader.dispose()
