"""YAML files whose errors can point at a line.

`load_yaml(path)` returns the data and a `Lines` map from a field path (as pydantic reports it:
`("models", 1, "sampling", "n")`) to the line where that value is written, so every config error
can say `file: models[1].sampling.n: line 14: ...`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from vlpref.errors import ConfigError

Loc = tuple[int | str, ...]


class Lines:
    """Line numbers (1-based) of the nodes of one YAML document."""

    def __init__(self, node: yaml.Node | None) -> None:
        self._lines: dict[Loc, int] = {}
        if node is not None:
            self._walk(node, ())

    def _walk(self, node: yaml.Node, loc: Loc) -> None:
        self._lines[loc] = node.start_mark.line + 1
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                child = (*loc, key_node.value)
                self._walk(value_node, child)
                self._lines[child] = key_node.start_mark.line + 1  # the key's line reads best
        elif isinstance(node, yaml.SequenceNode):
            for index, item in enumerate(node.value):
                self._walk(item, (*loc, index))

    def line(self, loc: Sequence[int | str]) -> int | None:
        """The line of the deepest ancestor of `loc` that is written in the file."""
        key: Loc = tuple(loc)
        while key:
            if key in self._lines:
                return self._lines[key]
            key = key[:-1]
        return self._lines.get(())


def format_loc(loc: Sequence[int | str]) -> str:
    """`("models", 1, "sampling")` -> `models[1].sampling`."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


def load_yaml(path: str | Path) -> tuple[Any, Lines]:
    """Parse one YAML file; a syntax error becomes a ConfigError with its line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read: {exc.strerror or exc}", file=str(path)) from exc
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        raise ConfigError(
            f"{where}invalid YAML: {getattr(exc, 'problem', exc)}", file=str(path)
        ) from exc
    return data, Lines(node)
