"""Reading ``routes.yaml``: safe YAML with line numbers and duplicate keys noticed, and
``${VAR}`` / ``${VAR:-default}`` substitution from the environment."""

from __future__ import annotations

import re
import typing
from collections.abc import Mapping
from typing import Any, Final

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


MERGE: Final = "tag:yaml.org,2002:merge"


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
        self._written: dict[int, set[int]] = {}  # see flatten_mapping

    def flatten_mapping(self, node: yaml.MappingNode) -> None:
        # The keys written in each mapping, noted before a merge (<<: *defaults) puts the
        # merged ones beside them: a mapping inside a merge is flattened in place, before
        # it is constructed (an anchor defined there and aliased later).
        if id(node) not in self._written:
            self._written[id(node)] = {id(k) for k, _ in node.value if k.tag != MERGE}
        super().flatten_mapping(node)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        # One of the keys written in this mapping written again is a duplicate; a merged
        # one written here is an override.
        self.flatten_mapping(node)
        written = self._written[id(node)]
        result: dict[Any, Any] = {}
        where: dict[Any, int] = {}
        seen: set[Any] = set()  # the written keys so far
        for key_node, value_node in node.value:
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, typing.Hashable):
                raise yaml.constructor.ConstructorError(
                    None, None, "unhashable key", key_node.start_mark
                )
            line = key_node.start_mark.line + 1
            if id(key_node) in written:
                if key in seen:
                    self.duplicates.append((id(result), key, line))
                seen.add(key)
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


def explain_yaml_error(text: str, exc: yaml.YAMLError) -> tuple[str, str, int | None]:
    """``(path, message, line)`` for a YAML syntax error, in words an operator can act on:
    the line and column, the YAML path of the block it happened in, and what the parser's
    complaint usually means (PyYAML says "expected <block end>, but found '<block mapping
    start>'" for a key indented one space too few)."""
    mark = getattr(exc, "problem_mark", None)
    if mark is None:
        return "", f"invalid YAML: {exc}", None
    path, blocks = _path_at_error(text)
    line, column = mark.line + 1, mark.column + 1
    problem = str(getattr(exc, "problem", "") or exc)
    context = str(getattr(exc, "context", "") or "")
    opened = getattr(exc, "context_mark", None)
    opened_at = f" (opened at line {opened.line + 1})" if opened is not None else ""
    if "expected <block end>" in problem:
        around = ", ".join(
            f"{'the keys' if mapping else 'the items'} of {where or 'the top level'} start at "
            f"column {col}"
            for where, mapping, col in blocks
        )
        why = "this line's indentation lines up with no block above it" + (
            f": {around}" if around else ""
        )
    elif "mapping values are not allowed" in problem:
        why = (
            "a ':' where the parser was reading the rest of a value: a line indented deeper "
            "than the key above it, or a value holding ': ' that needs quotes"
        )
    elif "'\\t'" in problem:
        why = "a tab character: YAML indents with spaces only"
    elif "could not find expected ':'" in problem:
        why = f"a key without its ':'{opened_at.replace('opened', 'the entry')}"
    elif "quoted scalar" in context:
        why = f"a quoted string that is never closed{opened_at}"
    elif "flow" in context and "end" in problem:
        why = f"a [ or {{ that is never closed{opened_at}"
    else:
        why = problem
    message = f"invalid YAML at line {line}, column {column}: {why} (the parser says: {problem})"
    return path, message, line


# A block on the parser's way: its path, whether it is a mapping, the column of its first entry.
Block = tuple[str, bool, int]


def _path_at_error(text: str) -> tuple[str, list[Block]]:
    """The YAML path the parser had reached when it failed, and the blocks an indentation
    error is measured against: the one it failed in, and the one it had just closed."""

    class Frame:
        def __init__(self, path: str, mapping: bool, column: int) -> None:
            self.path, self.mapping, self.column = path, mapping, column
            self.at: Any = None if mapping else -1  # the key being read, or the item index
            self.want_key = True

        def inner(self) -> str:
            if self.mapping:
                return self.path if self.want_key or self.at is None else _join(self.path, self.at)
            return self.path if self.at < 0 else f"{self.path}[{self.at}]"

    frames: list[Frame] = []
    closed: Frame | None = None

    def entry() -> Frame | None:
        """A node starts in the innermost block: a key, a value or an item of it."""
        top = frames[-1] if frames else None
        if top is not None and not top.mapping:
            top.at += 1
        return top

    try:
        for event in yaml.parse(text, Loader=yaml.SafeLoader):
            if isinstance(event, (yaml.ScalarEvent, yaml.AliasEvent)):
                top = entry()
                if top is not None and top.mapping:
                    if top.want_key:
                        top.at = getattr(event, "value", None)
                    top.want_key = not top.want_key
            elif isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
                top = entry()
                path = top.inner() if top is not None else ""
                mapping = isinstance(event, yaml.MappingStartEvent)
                column = event.start_mark.column + 1 if event.start_mark is not None else 0
                frames.append(Frame(path, mapping, column))
            elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
                closed = frames.pop()
                if frames and frames[-1].mapping:
                    frames[-1].want_key = True
    except yaml.YAMLError:
        pass
    blocks = [(f.path, f.mapping, f.column) for f in ([*frames[-1:], closed]) if f is not None]
    return (frames[-1].inner() if frames else ""), blocks


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)
