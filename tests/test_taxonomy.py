"""Tests of the harm taxonomy files and their loader."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from vlpref.errors import ConfigError
from vlpref.taxonomy import (
    KEY_PHRASE_MAX_CHARS,
    Subcategory,
    Taxonomy,
    branch_id,
    branches,
    load_taxonomy,
    loads_taxonomy,
)

ROOT = Path(__file__).resolve().parents[1]
SPA_VL = ROOT / "taxonomy" / "spa_vl.yaml"
DEMO = ROOT / "taxonomy" / "demo.yaml"

# The labels /work/shared/reference/spa-vl.md lists as SPA-VL's own, verbatim.
SPA_VL_DOMAINS = {
    "Representation & ToxicityHarms": ["Toxic", "Unfair"],
    "Misinformation Harms": ["Erosion of Trust in Public Information", "False Beliefs"],
    "Information & Safety Harms": ["Dangerous Information", "Privacy"],
    "Malicious Use": [
        "Security threats",
        "Defamation",
        "Fraud or deceptive action",
        "Influence Operations",
        "Illegal activities",
    ],
    "Human Autonomy & IntegrityHarms": [
        "Persuasion and manipulation",
        "Violation of Personal Property",
    ],
    "Socioeconomic Harms": ["Risky financial practices", "Trade and Compliance"],
}
SPA_VL_LEAVES = {
    "Toxic": ["bully", "harass", "hate", "insult", "terrorism", "threaten", "violent"],
    "Unfair": [
        "ageism",
        "disablity discrimination",
        "geographical discrimination",
        "racial",
        "religion",
        "sexism",
    ],
    "Erosion of Trust in Public Information": ["illegal drugs"],
    "Privacy": ["personal privacy"],
    "Security threats": ["biological and chemical harms", "cyber", "malware", "weapon"],
    "Fraud or deceptive action": [
        "academic dishonesty",
        "disinformation",
        "fake news",
        "financial fraud",
        "pseudo-pharmaceuticals",
        "rumors",
        "scamns",
        "spam information",
    ],
    "Illegal activities": [
        "drug-related crimes",
        "environmental crimes",
        "financial crimes",
        "theft",
        "traffic and driving offenses",
    ],
    "Persuasion and manipulation": ["physical harm"],
    "Violation of Personal Property": ["copyright infringement"],
    "Risky financial practices": ["gamble", "multi-level marketing", "paypal lending"],
}
# Categories whose full leaf list is known: the file must hold exactly those leaves.
FULLY_KNOWN = {"Toxic", "Unfair", "Security threats", "Fraud or deceptive action"}
SAFE_ID = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)*-[0-9a-f]{8}$")


@pytest.fixture(scope="module")
def spa_vl() -> Taxonomy:
    return load_taxonomy(SPA_VL)


@pytest.fixture(scope="module")
def demo() -> Taxonomy:
    return load_taxonomy(DEMO)


# --------------------------------------------------------------------------- shipped files


def test_spa_vl_shape(spa_vl: Taxonomy) -> None:
    assert spa_vl.name == "spa-vl"
    assert (len(spa_vl.domains), len(spa_vl.categories()), len(spa_vl.leaves())) == (6, 15, 53)
    known = sum(len(v) for v in SPA_VL_LEAVES.values())
    assert known == 37
    assert sum(leaf.spa_vl for leaf in spa_vl.leaves()) == known


def test_spa_vl_domain_and_category_labels_verbatim(spa_vl: Taxonomy) -> None:
    got = {d.name: [c.name for c in d.categories] for d in spa_vl.domains}
    assert got == SPA_VL_DOMAINS
    assert all(d.spa_vl for d in spa_vl.domains)
    assert all(c.spa_vl for c in spa_vl.categories())


def test_spa_vl_known_leaves_verbatim_and_marked(spa_vl: Taxonomy) -> None:
    by_category: dict[str, dict[str, Subcategory]] = {}
    for leaf in spa_vl.leaves():
        by_category.setdefault(leaf.class2, {})[leaf.class3] = leaf
    for category, labels in SPA_VL_LEAVES.items():
        for label in labels:
            assert label in by_category[category], f"{category}/{label} missing"
            assert by_category[category][label].spa_vl, f"{category}/{label} not marked spa-vl"
    for category in FULLY_KNOWN:
        assert sorted(by_category[category]) == sorted(SPA_VL_LEAVES[category])


def test_spa_vl_filled_leaves_are_marked_filled(spa_vl: Taxonomy) -> None:
    known = {(c, label) for c, labels in SPA_VL_LEAVES.items() for label in labels}
    filled = [leaf for leaf in spa_vl.leaves() if (leaf.class2, leaf.class3) not in known]
    assert len(filled) == 16
    assert not any(leaf.spa_vl for leaf in filled)
    # Every category holds at least one leaf, including the five with no known leaf.
    assert all(c.subcategories for c in spa_vl.categories())


def test_spa_vl_quirks_kept(spa_vl: Taxonomy) -> None:
    paths = {leaf.path for leaf in spa_vl.leaves()}
    assert "Representation & ToxicityHarms/Unfair/disablity discrimination" in paths
    assert "Malicious Use/Fraud or deceptive action/scamns" in paths
    assert any(p.startswith("Human Autonomy & IntegrityHarms/") for p in paths)


@pytest.mark.parametrize("path", [SPA_VL, DEMO], ids=["spa_vl", "demo"])
def test_every_leaf_has_keywords_and_key_phrase(path: Path) -> None:
    for leaf in load_taxonomy(path).leaves():
        assert len(leaf.keywords) >= 3, leaf.path
        assert 0 < len(leaf.key_phrase) <= KEY_PHRASE_MAX_CHARS
        assert leaf.path == f"{leaf.class1}/{leaf.class2}/{leaf.class3}"


def test_spa_vl_has_about_six_keywords(spa_vl: Taxonomy) -> None:
    assert {len(leaf.keywords) for leaf in spa_vl.leaves()} == {6}


def test_demo_is_a_slice_of_the_full_tree(demo: Taxonomy, spa_vl: Taxonomy) -> None:
    assert (len(demo.domains), len(demo.categories()), len(demo.leaves())) == (2, 3, 4)
    for leaf in demo.leaves():
        full = spa_vl.find(leaf.path)
        assert len(leaf.keywords) == 3
        assert set(leaf.keywords) <= set(full.keywords)
        assert (leaf.key_phrase, leaf.spa_vl) == (full.key_phrase, full.spa_vl)


# --------------------------------------------------------------------------- selection


def test_select_none_is_all(spa_vl: Taxonomy) -> None:
    assert spa_vl.select(None) == spa_vl.leaves()
    assert spa_vl.select() == spa_vl.leaves()


@pytest.mark.parametrize(
    ("prefix", "count"),
    [
        ("Malicious Use", 22),
        ("Malicious Use/Security threats", 4),
        ("Malicious Use/Security threats/cyber", 1),
        ("Malicious Use/Security threats/", 4),  # a trailing slash is harmless
        (" Malicious Use / Security threats ", 4),  # so is space around components
    ],
)
def test_select_by_prefix_depth(spa_vl: Taxonomy, prefix: str, count: int) -> None:
    selected = spa_vl.select([prefix])
    assert len(selected) == count
    assert all(leaf.path.startswith("Malicious Use/") for leaf in selected)


def test_select_union_in_file_order_without_repeats(spa_vl: Taxonomy) -> None:
    bully = "Representation & ToxicityHarms/Toxic/bully"
    selected = spa_vl.select(["Socioeconomic Harms", bully, "Socioeconomic Harms"])
    paths = [leaf.path for leaf in selected]
    assert len(paths) == 1 + 5
    assert paths[0] == bully  # file order, not the order of the prefixes
    assert paths == [leaf.path for leaf in spa_vl.leaves() if leaf.path in set(paths)]


def test_select_bare_string_is_one_prefix(spa_vl: Taxonomy) -> None:
    assert spa_vl.select("Malicious Use/Security threats") == spa_vl.select(
        ["Malicious Use/Security threats"]
    )


def test_select_matches_whole_components_only(spa_vl: Taxonomy) -> None:
    with pytest.raises(ConfigError, match="'Malicious Use/Security'"):
        spa_vl.select(["Malicious Use/Security"])


def test_unmatched_prefix_names_it_and_suggests(spa_vl: Taxonomy) -> None:
    with pytest.raises(ConfigError) as info:
        spa_vl.select(["Malicous Use/Security threats"])
    message = str(info.value)
    assert message.startswith(f"{SPA_VL}: ")
    assert "'Malicous Use/Security threats'" in message
    assert "'Malicious Use/Security threats'" in message


def test_unmatched_leaf_name_suggests_full_path(spa_vl: Taxonomy) -> None:
    with pytest.raises(ConfigError, match="Malicious Use/Security threats/malware"):
        spa_vl.select(["malwar"])


def test_unmatched_prefix_without_close_match_lists_domains(spa_vl: Taxonomy) -> None:
    with pytest.raises(ConfigError, match="domains are: 'Representation & ToxicityHarms'"):
        spa_vl.select(["zzzzzzzz"])


def test_empty_prefix_component_is_an_error(spa_vl: Taxonomy) -> None:
    with pytest.raises(ConfigError, match="empty path component"):
        spa_vl.select(["Malicious Use//cyber"])


def test_find(spa_vl: Taxonomy) -> None:
    leaf = spa_vl.find("Malicious Use/Security threats/cyber")
    assert (leaf.class1, leaf.class2, leaf.class3, leaf.spa_vl) == (
        "Malicious Use",
        "Security threats",
        "cyber",
        True,
    )
    with pytest.raises(ConfigError, match="not a subcategory"):
        spa_vl.find("Malicious Use/Security threats")
    with pytest.raises(ConfigError, match="close matches: 'Malicious Use/Security threats/cyber'"):
        spa_vl.find("Malicious Use/Security threats/cyberr")


# --------------------------------------------------------------------------- content hash


def test_hash_ignores_yaml_layout(spa_vl: Taxonomy, tmp_path: Path) -> None:
    data = yaml.safe_load(SPA_VL.read_text(encoding="utf-8"))
    for i, flow in enumerate([True, False]):
        text = yaml.safe_dump(data, default_flow_style=flow, sort_keys=True, indent=4, width=60)
        path = tmp_path / f"layout{i}.yaml"
        path.write_text("# reformatted\n" + text, encoding="utf-8")
        again = load_taxonomy(path)
        assert again == spa_vl
        assert again.content_hash == spa_vl.content_hash


def test_hash_changes_with_content(spa_vl: Taxonomy) -> None:
    data = yaml.safe_load(SPA_VL.read_text(encoding="utf-8"))
    data["domains"][0]["categories"][0]["subcategories"][0]["keywords"][0] = "playground bullying"
    changed = loads_taxonomy(yaml.safe_dump(data))
    assert re.fullmatch(r"[0-9a-f]{64}", spa_vl.content_hash)
    assert changed.content_hash != spa_vl.content_hash


def test_hash_ignores_taxonomy_name(demo: Taxonomy) -> None:
    data = demo.to_dict()
    data["name"] = "renamed"
    assert loads_taxonomy(yaml.safe_dump(data)).content_hash == demo.content_hash


def test_to_dict_round_trips(spa_vl: Taxonomy) -> None:
    assert loads_taxonomy(yaml.safe_dump(spa_vl.to_dict(), sort_keys=False)) == spa_vl


# --------------------------------------------------------------------------- validation

VALID = """\
name: t
domains:
  - name: D
    source: spa-vl
    categories:
      - name: C
        source: spa-vl
        subcategories:
          - name: leaf
            source: spa-vl
            key_phrase: a phrase
            keywords: [k1, k2]
"""
SECOND_LEAF = """\
          - name: leaf
            source: spa-vl
            key_phrase: b phrase
            keywords: [k3]
"""


def test_minimal_valid_document_loads() -> None:
    leaf = loads_taxonomy(VALID).find("D/C/leaf")
    assert (leaf.keywords, leaf.key_phrase, leaf.spa_vl) == (("k1", "k2"), "a phrase", True)


@pytest.mark.parametrize(
    ("old", "new", "field", "line", "message"),
    [
        (
            "key_phrase: a phrase\n",
            "key_phrase: a phrase\n            keyword: [x]\n",
            "D/C/leaf",
            12,
            "unknown key 'keyword' (did you mean 'keywords'?)",
        ),
        ("name: t\n", "name: t\nversion: 1\n", "(top level)", 2, "unknown key 'version'"),
        ("            key_phrase: a phrase\n", "", "D/C/leaf", 9, "missing field(s): key_phrase"),
        (
            "    source: spa-vl\n    categories",
            "    categories",
            "D",
            3,
            "missing field(s): source",
        ),
        ("name: leaf", 'name: ""', "D/C/subcategories[0]", 9, "name must not be empty"),
        ("name: C", "name: '  '", "D/categories[0]", 6, "name must not be empty"),
        ("name: leaf", "name: a/b", "D/C/subcategories[0]", 9, "contains '/'"),
        ("name: leaf", "name: ' leaf'", "D/C/subcategories[0]", 9, "leading or trailing"),
        ("name: leaf", "name: 2024", "D/C/subcategories[0]", 9, "name must be a string"),
        (
            "keywords: [k1, k2]\n",
            f"keywords: [k1, k2]\n{SECOND_LEAF}",
            "D/C/leaf",
            13,
            "duplicate path 'D/C/leaf' (first defined on line 9)",
        ),
        (
            "keywords: [k1, k2]",
            "keywords: []",
            "D/C/leaf",
            12,
            "keywords must be a non-empty list of strings",
        ),
        ("keywords: [k1, k2]", "keywords:", "D/C/leaf", 12, "keywords must be a non-empty list"),
        ("keywords: [k1, k2]", "keywords: k1", "D/C/leaf", 12, "keywords must be a non-empty list"),
        ("keywords: [k1, k2]", "keywords: [k1, 3]", "D/C/leaf", 12, "keyword must be a string"),
        ("keywords: [k1, k2]", "keywords: [k1, '']", "D/C/leaf", 12, "keyword must not be empty"),
        ("keywords: [k1, k2]", "keywords: [k1, [k2]]", "D/C/leaf", 12, "keyword must be a string"),
        (
            "keywords: [k1, k2]",
            "keywords:\n              - k1\n              - K1",
            "D/C/leaf",
            14,
            "duplicate keyword 'K1' (first on line 13)",
        ),
        ("keywords: [k1, k2]", "keywords: [k1, k1]", "D/C/leaf", 12, "duplicate keyword 'k1'"),
        (
            "            source: spa-vl\n            key",
            "            source: maybe\n            key",
            "D/C/leaf",
            10,
            "source must be one of ['spa-vl', 'filled']",
        ),
        (
            "        source: spa-vl\n",
            "        source: filled\n",
            "D/C/leaf",
            10,
            "source is 'spa-vl' under a 'filled' parent",
        ),
        ("key_phrase: a phrase", f"key_phrase: {'x' * 65}", "D/C/leaf", 11, "longer than 64"),
        ("key_phrase: a phrase", 'key_phrase: "a\\nb"', "D/C/leaf", 11, "line break"),
        (
            "    source: spa-vl\n",
            "    source: spa-vl\n    source: filled\n",
            "D",
            5,
            "key 'source' appears twice",
        ),
        (
            VALID[VALID.index("    categories:") :],
            "    categories: []\n",
            "D/categories",
            5,
            "categories must be a non-empty list",
        ),
        ("  - name: D", "  - just a string\n  - name: D", "domains[0]", 3, "expected a mapping"),
    ],
)
def test_validation_error_names_file_node_and_line(
    tmp_path: Path, old: str, new: str, field: str, line: int, message: str
) -> None:
    assert old in VALID
    bad = tmp_path / "bad.yaml"
    bad.write_text(VALID.replace(old, new, 1), encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_taxonomy(bad)
    assert str(info.value).startswith(f"{bad}: {field}: line {line}: "), str(info.value)
    assert message in str(info.value)
    assert (info.value.file, info.value.field) == (str(bad), field)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty taxonomy file"),
        ("name: t\ndomains: [\n", "line 3: invalid YAML"),
        ("- a\n- b\n", "(top level): line 1: expected a mapping"),
    ],
)
def test_file_level_errors(tmp_path: Path, text: str, message: str) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError, match=re.escape(message)) as info:
        load_taxonomy(bad)
    assert str(info.value).startswith(f"{bad}: ")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read taxonomy file"):
        load_taxonomy(tmp_path / "nope.yaml")


def test_builtin_names_load_the_shipped_files(demo: Taxonomy, spa_vl: Taxonomy) -> None:
    assert load_taxonomy("builtin:demo").content_hash == demo.content_hash
    assert load_taxonomy("builtin:spa_vl").content_hash == spa_vl.content_hash
    with pytest.raises(
        ConfigError, match=r"'builtin:full' \(builtin: builtin:demo, builtin:spa_vl\)"
    ):
        load_taxonomy("builtin:full")


# --------------------------------------------------------------------------- branches


def test_branch_ids_unique_and_safe(spa_vl: Taxonomy) -> None:
    ids = spa_vl.branches()
    assert len(ids) == 53
    assert all(SAFE_ID.fullmatch(i) for i in ids)
    assert list(ids.values()) == spa_vl.leaves()
    assert all(ids[leaf.branch_id] is leaf for leaf in spa_vl.leaves())


def test_branch_id_is_pinned() -> None:
    # Branch ids name directories of existing dataset versions: changing the scheme orphans them.
    assert branch_id("Malicious Use/Security threats/cyber") == (
        "malicious-use-security-threats-cyber-4a02aa8c"
    )


def test_branches_of_a_selection(spa_vl: Taxonomy) -> None:
    selected = spa_vl.branches(["Malicious Use/Security threats"])
    assert [leaf.class3 for leaf in selected.values()] == [
        "biological and chemical harms",
        "cyber",
        "malware",
        "weapon",
    ]


def test_branches_rejects_repeated_leaf(spa_vl: Taxonomy) -> None:
    leaf = spa_vl.leaves()[0]
    twin = dataclasses.replace(leaf)
    with pytest.raises(ConfigError, match="is shared by"):
        branches([leaf, twin])


_LABEL = st.text(min_size=1, max_size=40).filter(lambda s: "/" not in s)


@given(st.lists(_LABEL, min_size=3, max_size=3).map("/".join))
def test_branch_id_is_safe_and_stable(path: str) -> None:
    bid = branch_id(path)
    assert SAFE_ID.fullmatch(bid)
    assert len(bid) <= 64 + 1 + 8
    assert branch_id(path) == bid


@given(st.lists(_LABEL, min_size=3, max_size=3).map("/".join), st.data())
def test_branch_id_separates_paths_that_slug_alike(path: str, data: st.DataObject) -> None:
    other = data.draw(st.sampled_from([path.upper(), path.replace(" ", "-"), path + "!"]))
    if other != path:
        assert branch_id(other) != branch_id(path)
