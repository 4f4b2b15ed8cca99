"""Loading a plug-in class by name: the built-ins first, then an entry-point group (providers,
image filters). One place for the lookup, the import and the subclass check, so every kind of
plug-in fails the same way: an unknown name lists the known ones and the group to register in,
a broken one names its target."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from importlib.metadata import entry_points
from typing import Any

__all__ = ["available", "load_class"]


def available(builtins: Mapping[str, str], group: str) -> list[str]:
    """The built-in names and the entry points' names, sorted."""
    names = set(builtins)
    names.update(ep.name for ep in entry_points(group=group))
    return sorted(names)


def load_class(
    name: str,
    builtins: Mapping[str, str],
    group: str,
    base: type[Any],
    *,
    what: str,
    label: str,
    unknown: Callable[[str], Exception],
    broken: Callable[[str], Exception],
) -> type[Any]:
    """The class registered for `name` (`module:attr`): a built-in first, then the first entry
    point of `group` with that name. `unknown(message)` / `broken(message)` make the errors;
    `what` reads before the name when none is found ("provider of kind"), `label` when one
    cannot be used ("provider kind"). `base` may be abstract (mypy's type[T] would refuse one),
    so the caller's return type names the class."""
    target = builtins.get(name)
    if target is None:
        matches = [ep for ep in entry_points(group=group) if ep.name == name]
        if not matches:
            raise unknown(
                f"no {what} {name!r}; known: {', '.join(available(builtins, group))}. "
                f"Plug-ins register under the entry-point group {group!r}."
            )
        target = matches[0].value
    module_name, _, attr = target.partition(":")
    try:
        module = __import__(module_name, fromlist=[attr])
        cls = getattr(module, attr)
    except (ImportError, AttributeError) as exc:
        raise broken(f"{label} {name!r} ({target}) cannot be loaded: {exc}") from exc
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise broken(f"{label} {name!r} ({target}) is not a subclass of vlpref's {base.__name__}")
    return cls
