"""Comparing and describing dataset versions from their manifests (pure functions).

Used by `vlpref versions list | show | diff`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

TABLE_COUNTS = ("images", "questions", "responses", "judgments", "pairs")
# Column headers of `versions show`'s branch table: short, so 80 columns hold every number.
SHORT_NAMES = {"questions": "quest.", "responses": "resp.", "judgments": "judg."}


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists stay values."""
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(flatten(item, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): value}


def summary_row(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """One line of `versions list`."""
    branches = manifest.get("branches", {})
    statuses: dict[str, int] = {}
    for branch in branches.values():
        statuses[branch.get("status", "built")] = statuses.get(branch.get("status", "built"), 0) + 1
    # The id starts with its creation time (UTC), so no separate column for it: 80 columns fit.
    return {
        "version": manifest.get("version_id", ""),
        "parent": short_id(manifest.get("parent")),
        "branches": ", ".join(f"{n} {s}" for s, n in sorted(statuses.items())),
        "pairs": sum(s.get("rows", 0) for s in manifest.get("splits", {}).values()),
        "models": len(manifest.get("models", [])),
    }


def short_id(version_id: str | None) -> str:
    """A parent's id as `versions list` shows it: time of day and content hash
    (`20261201T172125.406412Z-26a15aa8` -> `T172125-26a15aa8`); the full id is in `show`."""
    if not version_id:
        return ""
    stamp, _, digest = version_id.partition("-")
    _day, _, time = stamp.partition("T")
    return f"T{time.split('.')[0].rstrip('Z')}-{digest}" if time and digest else version_id


def short_path(path: str) -> str:
    """A branch as `versions show` names it: its category and subcategory (the domain is in the
    manifest and the report), `Malicious Use/Security threats/cyber` -> `Security threats/cyber`."""
    parts = path.split("/")
    return "/".join(parts[-2:])


def taxonomy_text(taxonomy: Any) -> str:
    """`spa-vl-demo, 4 branches, 236408a2` from the manifest's taxonomy block."""
    if not isinstance(taxonomy, Mapping):
        return str(taxonomy)
    return (
        f"{taxonomy.get('name')}, {taxonomy.get('branches')} branches, "
        f"{str(taxonomy.get('hash', ''))[:8]}"
    )


def sampling_text(sampling: Any) -> str:
    """The sampling settings that are set, `temperature=0.9 max_tokens=160 n=2`."""
    if not isinstance(sampling, Mapping):
        return str(sampling)
    return " ".join(f"{k}={v}" for k, v in sampling.items() if v not in (None, False, [], {}))


def damaged_row(version_id: str) -> dict[str, Any]:
    """The line of `versions list` for a version that cannot be read: the same columns, marked
    damaged (the command prints why in a warning that names the file)."""
    return {
        "version": version_id,
        "parent": "",
        "branches": "DAMAGED",
        "pairs": "",
        "models": "",
    }


def branch_rows(manifest: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Per branch: path, status and row counts (for `versions show`)."""
    rows = []
    for branch in sorted(manifest.get("branches", {}).values(), key=lambda b: b["path"]):
        counts = branch.get("rows", {})
        rows.append(
            {
                "branch": short_path(branch["path"]),
                "status": branch.get("status", "built"),
                **{SHORT_NAMES.get(name, name): counts.get(name, 0) for name in TABLE_COUNTS},
                "failed": sum(
                    int(stage["counts"].get("failed", 0))
                    for stage in branch.get("stages", {}).values()
                ),
            }
        )
    return rows


def _models(manifest: Mapping[str, Any], key: str) -> dict[str, Any]:
    return {m["name"]: m for m in manifest.get(key, [])}


def diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """What changed from `old` to `new`: branches, splits, models, judges, prompts, config."""
    old_branches = {b["path"]: b for b in old.get("branches", {}).values()}
    new_branches = {b["path"]: b for b in new.get("branches", {}).values()}
    branches = []
    for path in sorted(set(old_branches) | set(new_branches)):
        a, b = old_branches.get(path), new_branches.get(path)
        if a is None or b is None:
            branches.append({"branch": path, "change": "added" if a is None else "removed"})
            continue
        deltas = {
            name: b.get("rows", {}).get(name, 0) - a.get("rows", {}).get(name, 0)
            for name in TABLE_COUNTS
        }
        same_data = a.get("publish_key") == b.get("publish_key")
        if not same_data or any(deltas.values()):
            branches.append({"branch": path, "change": "rebuilt", **deltas})
    splits = {}
    for name in sorted(set(old.get("splits", {})) | set(new.get("splits", {}))):
        before = old.get("splits", {}).get(name, {}).get("rows", 0)
        after = new.get("splits", {}).get(name, {}).get("rows", 0)
        splits[name] = {"old": before, "new": after, "delta": after - before}

    def model_changes(key: str) -> dict[str, list[str]]:
        a, b = _models(old, key), _models(new, key)
        return {
            "added": sorted(set(b) - set(a)),
            "removed": sorted(set(a) - set(b)),
            "changed": sorted(n for n in set(a) & set(b) if a[n] != b[n]),
        }

    old_prompts, new_prompts = old.get("prompts", {}), new.get("prompts", {})
    old_stages, new_stages = flatten(old.get("stages", {})), flatten(new.get("stages", {}))
    return {
        "old": old["version_id"],
        "new": new["version_id"],
        "branches": branches,
        "splits": splits,
        "models": model_changes("models"),
        "judges": model_changes("judges"),
        "generator_changed": old.get("generator") != new.get("generator"),
        "prompts_changed": sorted(
            n
            for n in set(old_prompts) | set(new_prompts)
            if old_prompts.get(n) != new_prompts.get(n)
        ),
        "config_changed": old.get("config_hash") != new.get("config_hash"),
        "settings": {
            key: {"old": old_stages.get(key), "new": new_stages.get(key)}
            for key in sorted(set(old_stages) | set(new_stages))
            if old_stages.get(key) != new_stages.get(key)
        },
        "taxonomy_changed": old.get("taxonomy", {}).get("hash")
        != new.get("taxonomy", {}).get("hash"),
    }
