"""Files shipped inside the vlpref package: the prompt templates and the harm taxonomies.

    vlpref/resources/prompts/<name>.txt      the templates `vlpref.prompts` loads by default
    vlpref/resources/taxonomy/<name>.yaml    the taxonomies a config names as `builtin:<name>`

They are package data, so an installed vlpref (a wheel, not only a checkout) has them. In a
checkout the top-level `prompts` and `taxonomy` are symlinks to these two folders, so a config
saying `taxonomy: taxonomy/demo.yaml` next to the repository still works.

Found as paths next to this file rather than through `importlib.resources`: a wheel installs
unzipped, and the callers want real paths (prompt files are cached by mtime; every error names
the file it read).
"""

from __future__ import annotations

from pathlib import Path

RESOURCES_DIR = Path(__file__).resolve().parent
PROMPTS_DIR = RESOURCES_DIR / "prompts"
TAXONOMY_DIR = RESOURCES_DIR / "taxonomy"

BUILTIN_PREFIX = "builtin:"
"""`taxonomy: builtin:spa_vl` in a run config names `TAXONOMY_DIR / "spa_vl.yaml"`."""


def builtin_taxonomies() -> tuple[str, ...]:
    """The names a config may give as `builtin:<name>`, sorted."""
    return tuple(sorted(path.stem for path in TAXONOMY_DIR.glob("*.yaml")))


def is_builtin(value: str) -> bool:
    """Whether `value` names a shipped taxonomy (`builtin:<name>`) rather than a path."""
    return value.startswith(BUILTIN_PREFIX)


def builtin_taxonomy(value: str) -> Path:
    """The file a `builtin:<name>` reference names. ValueError, listing the names, if unknown."""
    name = value.removeprefix(BUILTIN_PREFIX)
    names = builtin_taxonomies()
    if name not in names:
        raise ValueError(
            f"unknown builtin taxonomy {value!r} "
            f"(builtin: {', '.join(BUILTIN_PREFIX + n for n in names)})"
        )
    return TAXONOMY_DIR / f"{name}.yaml"
