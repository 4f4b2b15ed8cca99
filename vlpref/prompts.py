"""Prompt templates as files. Each template's hash is its version and enters the request key, so
editing a template reruns exactly the requests rendered from it.

Templates use `$name` placeholders (`string.Template`), which leaves JSON braces in the text
alone. Rendering with a missing or an unexpected field is an error naming the template file.
"""

from __future__ import annotations

import hashlib
import string
from dataclasses import dataclass
from functools import cache, cached_property
from pathlib import Path

from vlpref.errors import ConfigError
from vlpref.resources import PROMPTS_DIR

# The templates shipped with vlpref: package data in vlpref/resources/prompts/ (a checkout's
# top-level prompts/ is a symlink to it).
DEFAULT_PROMPTS_DIR = PROMPTS_DIR

PROMPT_NAMES = (
    "caption",
    "questions",
    "response",
    "judge_safety",
    "judge_rating",
    "judge_pairwise",
)


@dataclass(frozen=True)
class Prompt:
    name: str
    file: str
    text: str

    @property
    def version(self) -> str:
        """The template's content hash (name included: two templates never share a version)."""
        return hashlib.sha256(f"{self.name}\n{self.text}".encode()).hexdigest()[:16]

    @cached_property
    def fields(self) -> frozenset[str]:
        # Cached, like `_template`: a stage renders a template once per request.
        return frozenset(
            m.group("named") or m.group("braced")
            for m in self._template.pattern.finditer(self.text)
            if m.group("named") or m.group("braced")
        )

    @cached_property
    def _template(self) -> string.Template:
        return string.Template(self.text)

    def render(self, **values: str) -> str:
        if values.keys() != self.fields:
            raise ConfigError(
                f"template fields do not match: missing {sorted(self.fields - values.keys())}, "
                f"unexpected {sorted(values.keys() - self.fields)}",
                file=self.file,
            )
        return self._template.substitute(values)


@cache
def _load(path: str, mtime_ns: int) -> str:
    return Path(path).read_text(encoding="utf-8")


def load_prompt(name: str, prompts_dir: str | Path | None = None) -> Prompt:
    """Read `<prompts_dir>/<name>.txt` (the shipped templates by default)."""
    folder = Path(prompts_dir) if prompts_dir else DEFAULT_PROMPTS_DIR
    path = folder / f"{name}.txt"
    try:
        text = _load(str(path), path.stat().st_mtime_ns)
    except OSError as exc:
        raise ConfigError(
            f"cannot read prompt template: {exc.strerror or exc}", file=str(path)
        ) from exc
    prompt = Prompt(name, str(path), text)
    try:
        string.Template(text).substitute({f: "" for f in prompt.fields})
    except ValueError as exc:
        raise ConfigError(f"invalid template: {exc}", file=str(path)) from exc
    return prompt


def prompt_versions(prompts_dir: str | Path | None = None) -> dict[str, str]:
    """name -> version of every template a run uses (for manifests)."""
    return {name: load_prompt(name, prompts_dir).version for name in PROMPT_NAMES}
