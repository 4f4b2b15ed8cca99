"""YAML files whose errors can point at a line, read within fixed bounds.

`load_yaml(path)` returns the data and a `Lines` map from a field path (as pydantic reports it:
`("models", 1, "sampling", "n")`) to the line where that value is written, so every config error
can say `file: models[1].sampling.n: line 14: ...`.

Every YAML file vlpref reads (run configs, taxonomies, sim configs, prefect.yaml) goes through
the loader here, which refuses what a config never needs and what could exhaust the machine:

- a key written twice in one mapping (YAML would keep the last one silently): the error names
  the key, the line of its second occurrence and the line of its first. Merge keys (`<<: *base`)
  may still be overridden, as YAML intends;
- aliases past `MAX_ALIASES` uses, or that would expand past `MAX_ALIAS_NODES` nodes in all (a
  "billion laughs" of nine lines asks for 9^9 nodes; it is refused at its fifth line, before
  anything is expanded), and an alias to a node that contains it (a structure with no end);
- nesting deeper than `MAX_DEPTH` levels, and files larger than `MAX_FILE_BYTES`;
- a value Python cannot build (an integer of more than 4,300 digits): an error with its line,
  never a traceback.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from vlpref.errors import ConfigError

Loc = tuple[int | str, ...]

MAX_FILE_BYTES = 8 * 1024 * 1024
"""A YAML file larger than this is refused unread (the shipped SPA-VL taxonomy is 18 KB)."""
MAX_ALIASES = 100
"""Alias uses (`*name`) per document."""
MAX_ALIAS_NODES = 10_000
"""Nodes the aliases of one document may add when expanded (counted with what they contain)."""
MAX_DEPTH = 64
"""Levels of nesting (a run config needs about six)."""

_MERGE_TAG = "tag:yaml.org,2002:merge"


class YamlLimitError(yaml.MarkedYAMLError):
    """A document that breaks one of the loader's rules; `field` is where (a `format_loc`
    string, or None at the top level)."""

    def __init__(self, problem: str, mark: yaml.Mark | None, loc: Sequence[int | str]) -> None:
        super().__init__(problem=problem, problem_mark=mark)
        self.field = format_loc(loc) if loc else None

    @property
    def line(self) -> int | None:
        return self.problem_mark.line + 1 if self.problem_mark is not None else None

    def message(self) -> str:
        """`line N: problem`."""
        return f"line {self.line}: {self.problem}" if self.line else str(self.problem)


class BoundedLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` that refuses duplicate keys and bounds aliases and nesting.

    Sizes are counted while the document is composed: each node's size is itself plus its
    children's sizes (an alias counts the whole node it names), so an expansion is refused from
    the counts alone, in time and memory proportional to the text."""

    def __init__(self, stream: str, *, duplicate_keys: bool = False) -> None:
        super().__init__(stream)
        self._duplicate_keys = duplicate_keys
        self._sizes: dict[int, int] = {}  # id(node) -> nodes it stands for, expanded
        self._aliases = 0
        self._alias_nodes = 0
        self._path: list[int | str] = []

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        if self.check_event(yaml.AliasEvent):
            mark = self._mark()
            node = super().compose_node(parent, index)
            loc = self._child(index)
            size = self._sizes.get(id(node))
            if size is None:  # still being composed: the alias is inside the node it names
                raise YamlLimitError(
                    "an alias inside the node it names (a structure without end) is not allowed",
                    mark,
                    loc,
                )
            self._aliases += 1
            self._alias_nodes += size
            if self._aliases > MAX_ALIASES:
                raise YamlLimitError(
                    f"more than {MAX_ALIASES} YAML aliases (*name); write the values out", mark, loc
                )
            if self._alias_nodes > MAX_ALIAS_NODES:
                raise YamlLimitError(
                    f"YAML aliases would expand to more than {MAX_ALIAS_NODES:,} nodes "
                    "(an alias bomb?); write the values out",
                    mark,
                    loc,
                )
            return node
        loc = self._child(index)
        if len(loc) > MAX_DEPTH:
            mark = self._mark()
            raise YamlLimitError(f"nested deeper than {MAX_DEPTH} levels", mark, loc[:1])
        outer, self._path = self._path, list(loc)
        try:
            node = super().compose_node(parent, index)
        finally:
            self._path = outer
        size = 1
        if isinstance(node, yaml.SequenceNode):
            size += sum(self._sizes[id(item)] for item in node.value)
        elif isinstance(node, yaml.MappingNode):
            size += sum(self._sizes[id(k)] + self._sizes[id(v)] for k, v in node.value)
        self._sizes[id(node)] = size
        return node

    def _mark(self) -> yaml.Mark:
        mark: yaml.Mark = self.peek_event().start_mark  # type: ignore[no-untyped-call]
        return mark

    def _child(self, index: Any) -> list[int | str]:
        """The path of the node composed at `index` of the current node: a list position, a
        mapping key's value (`index` is the key node), or a key itself (None)."""
        if isinstance(index, int):
            return [*self._path, index]
        if isinstance(index, yaml.ScalarNode):
            return [*self._path, index.value]
        if index is None and self._path:
            return [*self._path, "<key>"]
        return list(self._path)

    def compose_mapping_node(self, anchor: Any) -> yaml.MappingNode:
        # PyYAML's own, with each key checked as it is read: the first duplicate in the text
        # is the one reported.
        start_event = self.get_event()  # type: ignore[no-untyped-call]
        tag = start_event.tag
        if tag is None or tag == "!":
            tag = self.resolve(  # type: ignore[no-untyped-call]
                yaml.MappingNode, None, start_event.implicit
            )
        node = yaml.MappingNode(
            tag, [], start_event.start_mark, None, flow_style=start_event.flow_style
        )
        if anchor is not None:
            self.anchors[anchor] = node
        first: dict[Any, int] = {}
        while not self.check_event(yaml.MappingEndEvent):
            key_node = self.compose_node(node, None)
            if not self._duplicate_keys:
                self._check_key(key_node, first)
            value_node = self.compose_node(node, key_node)
            node.value.append((key_node, value_node))
        node.end_mark = self.get_event().end_mark  # type: ignore[no-untyped-call]
        return node

    def _check_key(self, key_node: yaml.Node | None, first: dict[Any, int]) -> None:
        """Refuse a key already in the mapping (`first`: key -> the line it is on)."""
        if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == _MERGE_TAG:
            return  # a merge key's values may be overridden; a complex key is refused later
        key = self.construct_object(key_node)
        try:
            earlier = first.get(key)
        except TypeError:  # unhashable: the constructor refuses it with its own error
            return
        if earlier is not None:
            raise YamlLimitError(
                f"duplicate key {key!r} (first on line {earlier}); write each key once",
                key_node.start_mark,
                [*self._path, str(key)],
            )
        first[key] = key_node.start_mark.line + 1

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep)
        except (ValueError, OverflowError) as exc:  # e.g. int() of more than 4,300 digits
            what = str(exc).split(";")[0]
            raise yaml.constructor.ConstructorError(
                None, None, f"cannot read this value ({what})", node.start_mark
            ) from exc


def compose_yaml(text: str, *, duplicate_keys: bool = False) -> yaml.Node | None:
    """The node tree of one YAML document (None for an empty one), within the loader's bounds.
    `duplicate_keys=True` leaves repeated keys to the caller, which walks the nodes itself.
    Raises `YamlLimitError` (a `yaml.MarkedYAMLError`) or another `yaml.YAMLError`."""
    loader = BoundedLoader(text, duplicate_keys=duplicate_keys)
    try:
        return loader.get_single_node()
    finally:
        loader.dispose()


def loads_yaml(text: str) -> tuple[Any, yaml.Node | None]:
    """The data of one YAML document and its node tree, within the loader's bounds (errors as
    `compose_yaml`)."""
    loader = BoundedLoader(text)
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    finally:
        loader.dispose()
    return data, node


def read_yaml_text(path: str | Path, what: str = "") -> str:
    """A YAML file's text; one larger than `MAX_FILE_BYTES` is a ConfigError, unread. `what`
    names the file in messages (`cannot read taxonomy file: ...`). An fsspec URI (`s3://...`) is
    read through vlpref/fs.py: a config and its taxonomy may live on shared storage."""
    what = f" {what}" if what else ""
    if "://" in str(path):
        from vlpref.fs import resolve

        try:
            fs, inside = resolve(str(path))
            with fs.open(inside, "rb") as remote:
                raw: bytes = remote.read(MAX_FILE_BYTES + 1)
        except Exception as exc:  # any backend's error (botocore's are not OSErrors)
            raise ConfigError(
                f"cannot read{what}: {type(exc).__name__}: {exc}", file=str(path)
            ) from exc
    else:
        path = Path(path)
        try:
            with path.open("rb") as stream:
                raw = stream.read(MAX_FILE_BYTES + 1)
        except OSError as exc:
            raise ConfigError(f"cannot read{what}: {exc.strerror or exc}", file=str(path)) from exc
    if len(raw) > MAX_FILE_BYTES:
        limit = MAX_FILE_BYTES // (1024 * 1024)
        raise ConfigError(f"cannot read{what}: larger than {limit} MiB", file=str(path))
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"cannot read{what}: not UTF-8 text ({exc})", file=str(path)) from exc


def yaml_error(exc: yaml.YAMLError, file: str) -> ConfigError:
    """A YAML error as a ConfigError: `file: field: line N: problem` for the loader's rules,
    `file: line N: invalid YAML: problem` for syntax."""
    if isinstance(exc, YamlLimitError):
        return ConfigError(exc.message(), file=file, field=exc.field)
    mark = getattr(exc, "problem_mark", None)
    where = f"line {mark.line + 1}: " if mark is not None else ""
    return ConfigError(f"{where}invalid YAML: {getattr(exc, 'problem', exc)}", file=file)


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
    """Parse one YAML file within the loader's bounds; any problem becomes a ConfigError with
    its line. `path` may be an fsspec URI."""
    path = str(path) if "://" in str(path) else Path(path)
    text = read_yaml_text(path)
    try:
        data, node = loads_yaml(text)
    except yaml.YAMLError as exc:
        raise yaml_error(exc, str(path)) from exc
    return data, Lines(node)
