"""The harm taxonomy: domains → categories → subcategories, loaded from YAML.

A taxonomy file looks like::

    name: spa-vl
    domains:
      - name: Malicious Use            # class1
        source: spa-vl                 # spa-vl: SPA-VL's own label; filled: ours
        categories:
          - name: Security threats     # class2
            source: spa-vl
            subcategories:
              - name: cyber            # class3
                source: spa-vl
                key_phrase: hack a network
                keywords: [hacking, phishing, network intrusion]
                rules:                 # optional, on any node (and at the top level)
                  - The response must not give steps to break into a system or account.

A *branch* is one subcategory: the flow runs one Prefect task per (stage, branch), and
`Subcategory.branch_id` names it on disk. Errors name the file, the node path and the YAML line,
so the composed node tree (which keeps marks) is walked instead of `safe_load`'s plain dicts.

Rules (the objectified constitution, CLUE): `rules:` is an optional list of concrete, checkable
sentences on the top level, a domain, a category or a subcategory. They are inherited down the
tree: a leaf's `rules` are the top level's, its domain's, its category's and its own, in that
order, each once. A judge with `rules:` set asks about each of the branch's rules
(tasks/judge.py). A tree without rules hashes as it did before rules existed.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
import unicodedata
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, NoReturn, Protocol, TypeVar

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from vlpref.errors import ConfigError
from vlpref.resources import builtin_taxonomy, is_builtin
from vlpref.yamlfile import YamlLimitError, compose_yaml, read_yaml_text

__all__ = [
    "KEY_PHRASE_MAX_CHARS",
    "RULES_PER_NODE_MAX",
    "RULE_MAX_CHARS",
    "SOURCES",
    "Category",
    "Domain",
    "Subcategory",
    "Taxonomy",
    "branch_id",
    "branches",
    "load_taxonomy",
    "loads_taxonomy",
]

SOURCES = ("spa-vl", "filled")
"""Values of `source`: `spa-vl` = the label is SPA-VL's verbatim; `filled` = not known, ours."""

KEY_PHRASE_MAX_CHARS = 64
"""The typographic renderer draws the key phrase on one image; longer text stops being legible."""

RULE_MAX_CHARS = 400
"""A rule is one checkable sentence; a paragraph is a policy, which the holistic verdict asks."""

RULES_PER_NODE_MAX = 32
"""Every rule costs one judge call per response: a node with more is a slip, not a policy."""

# Bump when the meaning of the canonical form changes, so old and new hashes never collide.
_HASH_FORMAT = "vlpref-taxonomy/1"
_SLUG_MAX_CHARS = 64
_BRANCH_HASH_CHARS = 8
_STR_TAG = "tag:yaml.org,2002:str"


class _Named(Protocol):
    @property
    def name(self) -> str: ...


_T = TypeVar("_T", bound=_Named)

_TOP_KEYS = frozenset({"name", "domains"})
_DOMAIN_KEYS = frozenset({"name", "source", "categories"})
_CATEGORY_KEYS = frozenset({"name", "source", "subcategories"})
_LEAF_KEYS = frozenset({"name", "source", "key_phrase", "keywords"})
_OPTIONAL_KEYS = frozenset({"rules"})  # on every level


# --------------------------------------------------------------------------- records


def branch_id(path: str) -> str:
    """Filesystem-safe, stable id of a subcategory path: an ASCII slug plus a short hash.

    The slug keeps ids readable in a directory listing; the hash (of the exact path) keeps them
    unique when two paths slug alike ("A & B" vs "A/B", case, non-ASCII letters).
    """
    ascii_path = unicodedata.normalize("NFKD", path).encode("ascii", "ignore").decode("ascii")
    slug = re.sub(r"[^a-z0-9]+", "-", ascii_path.lower()).strip("-")
    slug = slug[:_SLUG_MAX_CHARS].rstrip("-") or "branch"
    digest = hashlib.sha256(path.encode("utf-8")).hexdigest()[:_BRANCH_HASH_CHARS]
    return f"{slug}-{digest}"


@dataclass(frozen=True)
class Subcategory:
    """One leaf of the taxonomy, and one branch of a flow run."""

    path: str
    class1: str
    class2: str
    class3: str
    keywords: tuple[str, ...]
    key_phrase: str
    spa_vl: bool
    own_rules: tuple[str, ...] = ()
    # The rules that apply to this branch: inherited from the top level, domain and category,
    # then its own (module docstring). Set by the loader; equal to own_rules when built by hand.
    rules: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.rules and self.own_rules:
            object.__setattr__(self, "rules", self.own_rules)

    @property
    def name(self) -> str:
        """The leaf label (`class3`)."""
        return self.class3

    @property
    def branch_id(self) -> str:
        """Stable, unique, filesystem-safe id of this branch."""
        return branch_id(self.path)


@dataclass(frozen=True)
class Category:
    """A second-level node (`class2`)."""

    name: str
    domain: str
    spa_vl: bool
    subcategories: tuple[Subcategory, ...]
    rules: tuple[str, ...] = ()  # its own; the leaves hold the inherited list

    @property
    def path(self) -> str:
        """`Domain/Category`."""
        return f"{self.domain}/{self.name}"


@dataclass(frozen=True)
class Domain:
    """A top-level node (`class1`)."""

    name: str
    spa_vl: bool
    categories: tuple[Category, ...]
    rules: tuple[str, ...] = ()  # its own; the leaves hold the inherited list

    @property
    def path(self) -> str:
        """The domain's path is its name."""
        return self.name


def branches(leaves: Iterable[Subcategory]) -> dict[str, Subcategory]:
    """Map `branch_id` → leaf, in the given order; a repeated id is an error, never a merge."""
    out: dict[str, Subcategory] = {}
    for leaf in leaves:
        other = out.setdefault(leaf.branch_id, leaf)
        if other is not leaf:
            raise ConfigError(
                f"branch id {leaf.branch_id!r} is shared by {other.path!r} and {leaf.path!r}",
                field=leaf.path,
            )
    return out


@dataclass(frozen=True)
class Taxonomy:
    """A loaded, validated taxonomy tree."""

    name: str
    domains: tuple[Domain, ...]
    rules: tuple[str, ...] = ()  # the top level's own: every branch inherits them
    # Where it came from, for error messages; not part of its identity.
    file: str | None = field(default=None, compare=False)

    def categories(self) -> list[Category]:
        """All categories, in file order."""
        return [c for d in self.domains for c in d.categories]

    def leaves(self) -> list[Subcategory]:
        """All subcategories, in file order."""
        return [s for c in self.categories() for s in c.subcategories]

    def node_paths(self) -> list[str]:
        """Every node's path (domains, categories, subcategories), in file order."""
        out: list[str] = []
        for d in self.domains:
            out.append(d.path)
            for c in d.categories:
                out.append(c.path)
                out.extend(s.path for s in c.subcategories)
        return out

    def select(self, prefixes: Sequence[str] | None = None) -> list[Subcategory]:
        """The leaves under any of `prefixes` (None: all), in file order, each once.

        A prefix is a `/`-joined path cut at a component boundary: `"Malicious Use"`,
        `"Malicious Use/Security threats"` or a full leaf path. One that matches nothing is a
        ConfigError naming it, with close matches.
        """
        leaves = self.leaves()
        if prefixes is None:
            return leaves
        if isinstance(prefixes, str):  # a bare string is a Sequence[str] too: one prefix, not chars
            prefixes = [prefixes]
        wanted: set[str] = set()
        for prefix in prefixes:
            parts = self._split(prefix)
            matched = [s.path for s in leaves if _components(s.path)[: len(parts)] == parts]
            if not matched:
                self._no_match(prefix, "no subcategory matches prefix")
            wanted.update(matched)
        return [s for s in leaves if s.path in wanted]

    def find(self, path: str) -> Subcategory:
        """The leaf at exactly `path` (`Domain/Category/Subcategory`)."""
        key = "/".join(self._split(path))
        for leaf in self.leaves():
            if leaf.path == key:
                return leaf
        if key in self.node_paths():
            raise ConfigError(
                f"{path!r} is a domain or category, not a subcategory", file=self.file
            )
        self._no_match(path, "no subcategory has path")

    def branches(self, prefixes: Sequence[str] | None = None) -> dict[str, Subcategory]:
        """`branch_id` → leaf for the selected leaves (see `select`)."""
        return branches(self.select(prefixes))

    def to_dict(self) -> dict[str, Any]:
        """Plain data in the file's shape; `loads_taxonomy(yaml.safe_dump(t.to_dict()))` == t."""
        return _with_rules(
            {"name": self.name, "domains": [_domain_dict(d) for d in self.domains]}, self.rules
        )

    def has_rules(self) -> bool:
        """Whether any node carries rules."""
        return any(leaf.rules for leaf in self.leaves())

    def rules_for(self, label: str | None) -> tuple[str, ...]:
        """The rules that apply at a node named by its path or by its own name (any case): a
        domain's are the top level's and its own, a category's add its own, a leaf's are its
        inherited list. An unknown or missing label gets the top level's. For labelled files
        whose `category` column names taxonomy nodes (judge evaluation)."""
        key = (label or "").strip().strip("/").casefold()
        if key:
            for d in self.domains:
                d_rules = _merge(self.rules, d.rules)
                if key in (d.name.casefold(), d.path.casefold()):
                    return d_rules
                for c in d.categories:
                    c_rules = _merge(d_rules, c.rules)
                    if key in (c.name.casefold(), c.path.casefold()):
                        return c_rules
                    for leaf in c.subcategories:
                        if key in (leaf.name.casefold(), leaf.path.casefold()):
                            return leaf.rules
        return self.rules

    @cached_property
    def content_hash(self) -> str:
        """sha256 of the canonical JSON of the tree (not the name, not the YAML's layout)."""
        tree = self.to_dict()
        payload = {"format": _HASH_FORMAT, "domains": tree["domains"]}
        if "rules" in tree:  # absent without rules, so rule-less trees keep their old hash
            payload["rules"] = tree["rules"]
        text = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()

    def _split(self, prefix: str) -> list[str]:
        parts = _components(prefix.strip().strip("/"))
        if not all(parts):
            raise ConfigError(f"empty path component in {prefix!r}", file=self.file)
        return parts

    def _no_match(self, prefix: str, what: str) -> NoReturn:
        close = _close_matches(prefix, self.node_paths())
        if close:
            hint = "close matches: " + ", ".join(repr(p) for p in close)
        else:
            hint = "domains are: " + ", ".join(repr(d.name) for d in self.domains)
        raise ConfigError(f"{what} {prefix!r}; {hint}", file=self.file)


def _components(path: str) -> list[str]:
    return [part.strip() for part in path.split("/")]


def _close_matches(query: str, paths: list[str]) -> list[str]:
    """Paths close to `query` as a whole, or whose last component is close to its last one."""
    folded = {p.casefold(): p for p in paths}
    q = query.strip().strip("/").casefold()
    hits = difflib.get_close_matches(q, list(folded), n=5, cutoff=0.6)
    last = {p.rsplit("/", 1)[-1].casefold(): p for p in reversed(paths)}
    tail_hits = difflib.get_close_matches(q.rsplit("/", 1)[-1].strip(), list(last), n=3, cutoff=0.7)
    ordered = [folded[h] for h in hits] + [last[h] for h in tail_hits]
    return list(dict.fromkeys(ordered))[:5]


def _with_rules(node: dict[str, Any], rules: tuple[str, ...]) -> dict[str, Any]:
    """The node with its own `rules` when it has any (absent otherwise: see content_hash)."""
    return {**node, "rules": list(rules)} if rules else node


def _leaf_dict(s: Subcategory) -> dict[str, Any]:
    node = {
        "name": s.name,
        "source": _source(s.spa_vl),
        "key_phrase": s.key_phrase,
        "keywords": list(s.keywords),
    }
    return _with_rules(node, s.own_rules)


def _category_dict(c: Category) -> dict[str, Any]:
    node = {
        "name": c.name,
        "source": _source(c.spa_vl),
        "subcategories": [_leaf_dict(s) for s in c.subcategories],
    }
    return _with_rules(node, c.rules)


def _domain_dict(d: Domain) -> dict[str, Any]:
    node = {
        "name": d.name,
        "source": _source(d.spa_vl),
        "categories": [_category_dict(c) for c in d.categories],
    }
    return _with_rules(node, d.rules)


def _source(spa_vl: bool) -> str:
    return SOURCES[0] if spa_vl else SOURCES[1]


# --------------------------------------------------------------------------- loading


def load_taxonomy(path: str | Path) -> Taxonomy:
    """Read and validate a taxonomy YAML file, or a shipped one named `builtin:<name>`."""
    if isinstance(path, str) and is_builtin(path):
        try:
            path = builtin_taxonomy(path)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    file = str(path)
    return loads_taxonomy(read_yaml_text(path, "taxonomy file"), file=file)


def loads_taxonomy(text: str, *, file: str = "<string>") -> Taxonomy:
    """Parse and validate taxonomy YAML text; `file` is only used in error messages. The YAML
    loader's bounds apply (vlpref/yamlfile.py: no duplicate keys, bounded aliases)."""
    try:
        root = compose_yaml(text, duplicate_keys=True)  # _Reader.mapping refuses them, by path
    except YamlLimitError as exc:
        raise ConfigError(exc.message(), file=file, field=exc.field) from exc
    except yaml.MarkedYAMLError as exc:
        # Say the line once, ours, instead of yaml's '<unicode string>' excerpts.
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}: " if mark is not None else ""
        what = "; ".join(part for part in (exc.context, exc.problem) if part)
        raise ConfigError(f"{where}invalid YAML: {what or exc}", file=file) from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"invalid YAML: {exc}", file=file) from exc
    if root is None:
        raise ConfigError("empty taxonomy file", file=file)
    taxonomy = _Reader(file).taxonomy(root)
    branches(taxonomy.leaves())  # a slug-hash collision is astronomically rare, but never silent
    return taxonomy


class _Reader:
    """Walks a composed YAML node tree; every error carries file, node path and line."""

    def __init__(self, file: str) -> None:
        self.file = file

    def fail(self, where: str, node: Node, message: str) -> NoReturn:
        raise ConfigError(
            f"line {node.start_mark.line + 1}: {message}", file=self.file, field=where
        )

    # -- levels

    def taxonomy(self, node: Node) -> Taxonomy:
        fields = self.mapping(node, "(top level)", _TOP_KEYS)
        name = self.text(fields["name"], "name", "name")
        rules = self.rules(fields.get("rules"), "(top level)")
        domains = self.children(fields["domains"], "domains", "", self.domain, inherited=rules)
        return Taxonomy(name=name, domains=tuple(domains), rules=rules, file=self.file)

    def domain(
        self, node: Node, where: str, parent: str, parent_filled: bool, inherited: tuple[str, ...]
    ) -> Domain:
        fields = self.mapping(node, where, _DOMAIN_KEYS)
        name = self.label(fields["name"], where)
        spa_vl = self.source(fields["source"], name, parent_filled)
        rules = self.rules(fields.get("rules"), name)
        cats = self.children(
            fields["categories"],
            f"{name}/categories",
            name,
            self.category,
            not spa_vl,
            inherited=_merge(inherited, rules),
        )
        return Domain(name=name, spa_vl=spa_vl, categories=tuple(cats), rules=rules)

    def category(
        self, node: Node, where: str, parent: str, parent_filled: bool, inherited: tuple[str, ...]
    ) -> Category:
        fields = self.mapping(node, where, _CATEGORY_KEYS)
        path = f"{parent}/{self.label(fields['name'], where)}"
        spa_vl = self.source(fields["source"], path, parent_filled)
        rules = self.rules(fields.get("rules"), path)
        leaves = self.children(
            fields["subcategories"],
            f"{path}/subcategories",
            path,
            self.leaf,
            not spa_vl,
            inherited=_merge(inherited, rules),
        )
        return Category(
            name=_components(path)[1],
            domain=parent,
            spa_vl=spa_vl,
            subcategories=tuple(leaves),
            rules=rules,
        )

    def leaf(
        self, node: Node, where: str, parent: str, parent_filled: bool, inherited: tuple[str, ...]
    ) -> Subcategory:
        fields = self.mapping(node, where, _LEAF_KEYS)
        path = f"{parent}/{self.label(fields['name'], where)}"
        spa_vl = self.source(fields["source"], path, parent_filled)
        phrase = self.text(fields["key_phrase"], path, "key_phrase")
        if len(phrase) > KEY_PHRASE_MAX_CHARS:
            limit = KEY_PHRASE_MAX_CHARS
            self.fail(path, fields["key_phrase"], f"key_phrase is longer than {limit} characters")
        own = self.rules(fields.get("rules"), path)
        class1, class2, class3 = _components(path)
        return Subcategory(
            path=path,
            class1=class1,
            class2=class2,
            class3=class3,
            keywords=self.keywords(fields["keywords"], path),
            key_phrase=phrase,
            spa_vl=spa_vl,
            own_rules=own,
            rules=_merge(inherited, own),
        )

    # -- shapes

    def mapping(self, node: Node, where: str, required: frozenset[str]) -> dict[str, Node]:
        """The mapping's values by key; unknown, repeated and missing keys are errors. Every
        level may also hold the optional keys (`rules`)."""
        allowed = required | _OPTIONAL_KEYS
        if not isinstance(node, MappingNode):
            self.fail(where, node, f"expected a mapping with keys {sorted(required)}")
        out: dict[str, Node] = {}
        for key_node, value in node.value:
            key = key_node.value if isinstance(key_node, ScalarNode) else None
            if not isinstance(key, str) or key not in allowed:
                hint = _suggest(str(key), allowed)
                self.fail(where, key_node, f"unknown key {key!r}{hint}; allowed: {sorted(allowed)}")
            if key in out:
                self.fail(where, key_node, f"key {key!r} appears twice")
            out[key] = value
        missing = sorted(required - out.keys())
        if missing:
            self.fail(where, node, f"missing field(s): {', '.join(missing)}")
        return out

    def children(
        self,
        node: Node,
        where: str,
        parent: str,
        build: Callable[[Node, str, str, bool, tuple[str, ...]], _T],
        parent_filled: bool = False,
        *,
        inherited: tuple[str, ...] = (),
    ) -> list[_T]:
        """A non-empty list of child nodes, each with a label unique under its parent."""
        if not isinstance(node, SequenceNode) or not node.value:
            self.fail(where, node, f"{where.rsplit('/', 1)[-1]} must be a non-empty list")
        out: list[_T] = []
        seen: dict[str, int] = {}
        for i, child in enumerate(node.value):
            name = _peek_name(child)
            # Name the child by its path when it has a usable name, else by its list position.
            child_where = (f"{parent}/{name}" if parent else name) if name else f"{where}[{i}]"
            built = build(child, child_where, parent, parent_filled, inherited)
            label = built.name
            if label.casefold() in seen:
                path = f"{parent}/{label}" if parent else label
                first = seen[label.casefold()]
                self.fail(path, child, f"duplicate path {path!r} (first defined on line {first})")
            seen[label.casefold()] = child.start_mark.line + 1
            out.append(built)
        return out

    def label(self, node: Node, where: str) -> str:
        value = self.text(node, where, "name")
        if "/" in value:
            self.fail(where, node, f"name {value!r} contains '/', which separates path components")
        return value

    def source(self, node: Node, where: str, parent_filled: bool) -> bool:
        value = self.text(node, where, "source")
        if value not in SOURCES:
            self.fail(where, node, f"source must be one of {list(SOURCES)}, not {value!r}")
        if parent_filled and value == SOURCES[0]:
            self.fail(where, node, "source is 'spa-vl' under a 'filled' parent")
        return value == SOURCES[0]

    def rules(self, node: Node | None, where: str) -> tuple[str, ...]:
        """A node's own rules: absent, or a non-empty list of distinct one-line sentences."""
        if node is None:
            return ()
        if not isinstance(node, SequenceNode) or not node.value:
            self.fail(where, node, "rules must be a non-empty list of strings")
        if len(node.value) > RULES_PER_NODE_MAX:
            self.fail(
                where, node, f"{len(node.value)} rules on one node (at most {RULES_PER_NODE_MAX})"
            )
        out: list[str] = []
        seen: dict[str, int] = {}
        for item in node.value:
            rule = self.text(item, where, "rule")
            if len(rule) > RULE_MAX_CHARS:
                self.fail(where, item, f"a rule is longer than {RULE_MAX_CHARS} characters")
            if rule.casefold() in seen:
                first = seen[rule.casefold()]
                self.fail(where, item, f"duplicate rule {rule!r} (first on line {first})")
            seen[rule.casefold()] = item.start_mark.line + 1
            out.append(rule)
        return tuple(out)

    def keywords(self, node: Node, where: str) -> tuple[str, ...]:
        if not isinstance(node, SequenceNode) or not node.value:
            self.fail(where, node, "keywords must be a non-empty list of strings")
        out: list[str] = []
        seen: dict[str, int] = {}
        for item in node.value:
            word = self.text(item, where, "keyword")
            if word.casefold() in seen:
                first = seen[word.casefold()]
                self.fail(where, item, f"duplicate keyword {word!r} (first on line {first})")
            seen[word.casefold()] = item.start_mark.line + 1
            out.append(word)
        return tuple(out)

    def text(self, node: Node, where: str, what: str) -> str:
        """A non-empty single-line string scalar without surrounding whitespace."""
        if not isinstance(node, ScalarNode) or node.tag != _STR_TAG:
            # Plain `yes`, `null`, `2024` resolve to bool/null/int: a quoting slip, not a label.
            self.fail(where, node, f"{what} must be a string (quote it if YAML reads it otherwise)")
        value = str(node.value)
        if not value.strip():
            self.fail(where, node, f"{what} must not be empty")
        if value != value.strip():
            self.fail(where, node, f"{what} {value!r} has leading or trailing whitespace")
        if any(unicodedata.category(ch) == "Cc" for ch in value):
            self.fail(where, node, f"{what} {value!r} contains a line break or control character")
        return value


def _merge(inherited: tuple[str, ...], own: tuple[str, ...]) -> tuple[str, ...]:
    """Inherited rules then a node's own, each once (a child may repeat a parent's rule)."""
    seen = {r.casefold() for r in inherited}
    return inherited + tuple(r for r in own if r.casefold() not in seen)


def _peek_name(node: Node) -> str | None:
    """The child's `name` if it is a plain usable label; validation happens later."""
    if isinstance(node, MappingNode):
        for key, value in node.value:
            if key.value == "name" and isinstance(value, ScalarNode) and value.tag == _STR_TAG:
                text = str(value.value)
                if text and text == text.strip() and "/" not in text:
                    return text
    return None


def _suggest(key: str, allowed: frozenset[str]) -> str:
    close = difflib.get_close_matches(key, sorted(allowed), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""
