"""The report built from a real published version (real Parquet through `Store.publish`), the
store's extras hook that writes it at publish, the `report` command and the console summary's
last line. The flow-built version in a real browser is test_browser.py."""

from __future__ import annotations

import io
import re
import webbrowser
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
import typer
import yaml
from rich.console import Console
from typer.testing import CliRunner

from tests.tasks.test_publish import make_tables, of_branch
from vlpref.config import PublishStage
from vlpref.errors import StoreError
from vlpref.publish import branch_parts, dataset_card
from vlpref.publish.version import link_report, report_link, version_report
from vlpref.report import print_report_path
from vlpref.report_html import REPORT_NAME, build_report
from vlpref.report_html.command import default_output, report
from vlpref.store import Store, Version

STAGE = PublishStage(splits={"train": 0.6, "validation": 0.2, "test": 0.2}, seed=0)
MANIFEST: dict[str, Any] = {
    "name": "report-test",
    "models": [{"name": "safe-model", "model": "s"}, {"name": "risky-model", "model": "r"}],
    "judges": [{"name": "judge", "model": "j"}],
}
HOSTILE = '<script>alert("x")</script><img src=x onerror=alert(1)>'


def parts(tables: dict[str, pa.Table]) -> dict[str, pa.Table]:
    return {
        **branch_parts("b1", of_branch(tables, 0), STAGE),
        **branch_parts("b2", of_branch(tables, 1), STAGE),
    }


@pytest.fixture(scope="module")
def tables() -> dict[str, pa.Table]:
    tables = make_tables()
    # Model output and generated questions are data, never markup: every question is hostile.
    questions = tables["questions"]
    index = questions.schema.get_field_index("text")
    hostile = pa.array([HOSTILE] * questions.num_rows, pa.string())
    tables["questions"] = questions.set_column(index, "text", hostile)
    return tables


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, tables: dict[str, pa.Table]) -> Store:
    """Two versions: the first without a report, the second (its child) with one."""
    st = Store(str(tmp_path_factory.mktemp("store")))
    first = st.publish(parts(tables), MANIFEST, dataset_card)
    st.publish(
        parts(tables),
        {**MANIFEST, "models": MANIFEST["models"][:1]},
        dataset_card,
        parent=first.version_id,
        extras={REPORT_NAME: build_report},
    )
    return st


def versions(store: Store) -> tuple[Version, Version]:
    first, second = store.list_versions()
    return store.open(first.version_id), store.open(second.version_id)


def test_publish_writes_the_report_listed_and_verified(store: Store) -> None:
    first, second = versions(store)
    assert REPORT_NAME not in first.manifest["files"]
    entry = second.manifest["files"][REPORT_NAME]
    text = Path(second.path(REPORT_NAME)).read_bytes()
    assert entry["size"] == len(text)
    second.verify()  # the report's sha256 is checked like every other file
    # Built from the staged version: it names the final version id and reads its data.
    assert f'<b id="version-id">{second.version_id}</b>' in text.decode()


def test_the_report_is_deterministic_and_self_contained(store: Store) -> None:
    _, second = versions(store)
    html = build_report(second)
    assert html == Path(second.path(REPORT_NAME)).read_bytes()  # same version, same bytes
    text = html.decode()
    assert text.startswith("<!DOCTYPE html>")
    assert "default-src 'none'" in text  # the page may load nothing
    # Every src / href is inline data or an anchor on the page.
    for match in re.finditer(r'\b(?:src|href)\s*=\s*"([^"]*)"', text):
        assert match[1].startswith(("data:", "#")), match[0]
    assert "url(http" not in text and "@import" not in text


def test_data_is_escaped(store: Store) -> None:
    text = build_report(versions(store)[1]).decode()
    assert HOSTILE not in text
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in text
    assert text.count("<script>") == 1  # the page's own filter script


def test_what_a_version_lacks_is_said_not_plotted(store: Store) -> None:
    # make_tables has safety judgments only: no ratings, no pairwise, no failures of note.
    text = build_report(versions(store)[1]).decode()
    assert "This version has no rating judgments." in text
    assert "This version has no pairwise judgments." in text
    assert "The manifest has no judge agreement" in text
    assert 'id="ratings-bars"' not in text
    # What it has is plotted: the heatmap, a cell per model and category.
    heatmap = text[text.index('<figure id="unsafe-heatmap">') :]
    heatmap = heatmap[: heatmap.index("</figure>")]
    assert len(re.findall(r'id="unsafe-heatcell-\d+-\d+"', heatmap)) == 2 * 2


def test_the_changes_from_the_parent(store: Store) -> None:
    first, second = versions(store)
    text = build_report(second).decode()
    changes = text[text.index('<section id="changes">') :]
    assert f"From {first.version_id} to this version" in changes
    assert "models removed: risky-model" in changes
    no_parent = build_report(first).decode()
    assert "This version has no parent" in no_parent


def test_the_gallery_reads_thumbnails_of_its_sample(store: Store) -> None:
    _, second = versions(store)
    text = build_report(second).decode()
    cards = re.findall(r'<article class="card" data-category="([^"]*)"', text)
    pairs = second.table("pairs")
    assert 0 < len(cards) <= pairs.num_rows
    assert len(re.findall(r'<img src="data:image/(?:jpeg|png);base64,', text)) == len(cards)
    categories = {
        f"{a} / {b}"
        for a, b in zip(
            second.table("questions")["class1"].to_pylist(),
            second.table("questions")["class2"].to_pylist(),
            strict=True,
        )
    }
    assert {html_unescape(c) for c in cards} == categories


def html_unescape(text: str) -> str:
    import html

    return html.unescape(text)


# --- the store's extras hook --------------------------------------------------------------------


def test_an_extra_sees_the_staged_version_and_may_write_nothing(
    tmp_path: Path, tables: dict[str, pa.Table]
) -> None:
    st = Store(str(tmp_path / "store"))
    seen: dict[str, Any] = {}

    def probe(version: Version) -> bytes:
        seen["id"] = version.version_id
        seen["files"] = sorted(version.manifest["files"])
        seen["pairs"] = version.table("pairs", ["pair_id"]).num_rows
        return b"probe"

    def card(manifest: Mapping[str, Any]) -> str:
        seen["card sees"] = sorted(set(manifest["files"]) & {"probe.txt", "none.txt"})
        return dataset_card(manifest)

    info = st.publish(
        parts(tables), MANIFEST, card, extras={"probe.txt": probe, "none.txt": lambda v: None}
    )
    version = st.open(info.version_id)
    assert seen["id"] == info.version_id
    # The data and the splits, not yet the card (it may link the extras) nor the extra itself.
    assert "data/train/b1.parquet" in seen["files"]
    assert "README.md" not in seen["files"] and "probe.txt" not in seen["files"]
    assert seen["card sees"] == ["probe.txt"]  # so a card can link the report
    assert seen["pairs"] == tables["pairs"].num_rows
    assert Path(version.path("probe.txt")).read_bytes() == b"probe"
    assert "none.txt" not in version.manifest["files"]
    assert not Path(version.path("none.txt")).exists()
    version.verify()


@pytest.mark.parametrize("name", ["README.md", "manifest.json", "_COMPLETE", "../x", "a/b", ""])
def test_an_extra_may_not_take_a_name_of_the_store(
    tmp_path: Path, tables: dict[str, pa.Table], name: str
) -> None:
    st = Store(str(tmp_path / "store"))
    with pytest.raises(StoreError, match="extra file"):
        st.publish(parts(tables), MANIFEST, dataset_card, extras={name: lambda v: b""})
    assert st.list_versions() == []


def test_an_extra_that_fails_fails_the_publish(tmp_path: Path, tables: dict[str, pa.Table]) -> None:
    st = Store(str(tmp_path / "store"))

    def broken(version: Version) -> bytes:
        raise RuntimeError("broken extra")

    with pytest.raises(RuntimeError, match="broken extra"):
        st.publish(parts(tables), MANIFEST, dataset_card, extras={"x.html": broken})
    assert st.list_versions() == []
    assert list((tmp_path / "store" / ".staging").iterdir()) == []


def test_the_flow_leaves_out_a_report_that_fails(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    class Unreadable(Version):
        def table(self, name: str, columns: list[str] | None = None) -> pa.Table:
            raise StoreError(f"{name}: unreadable")

    _, second = versions(store)
    broken = Unreadable(second.store, second.info)
    with caplog.at_level("WARNING"):
        assert version_report(broken) is None
    assert f"vlpref report {second.version_id}" in caplog.text
    assert version_report(second) == build_report(second)


def test_the_report_link_outside_a_flow_run(store: Store) -> None:
    _, second = versions(store)
    link = report_link(second.info)
    assert link == Path(second.path(REPORT_NAME)).as_uri()
    link_report(second)  # no flow run: nothing to link, and no error


# --- the command --------------------------------------------------------------------------------


def app() -> typer.Typer:
    throwaway = typer.Typer()
    throwaway.command("report")(report)
    throwaway.command("other")(lambda: None)  # two commands: typer keeps the "report" name
    return throwaway


def test_the_command_rebuilds_outside_the_version(store: Store, tmp_path: Path) -> None:
    _, second = versions(store)
    out = tmp_path / "out" / "r.html"
    result = CliRunner().invoke(
        app(), ["report", "latest", "--store", store.location, "-o", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert result.stdout.strip().splitlines()[-1] == str(out.resolve())
    assert out.read_bytes() == Path(second.path(REPORT_NAME)).read_bytes()


def test_the_command_writes_to_the_workspace_or_the_current_folder(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first, _ = versions(store)
    monkeypatch.chdir(tmp_path)
    opened: list[str] = []

    def browser_open(url: str, *args: Any, **kwargs: Any) -> bool:
        opened.append(url)
        return True

    monkeypatch.setattr(webbrowser, "open", browser_open)
    result = CliRunner().invoke(app(), ["report", first.version_id, "-s", store.location, "--open"])
    assert result.exit_code == 0, result.output
    expected = tmp_path / "reports" / f"{first.version_id}.html"
    assert expected.is_file() and opened == [expected.resolve().as_uri()]
    # A version without its own report gets one: the version folder is left as it was.
    assert not Path(first.path(REPORT_NAME)).exists()
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(run_config(store, tmp_path / "ws")))
    assert default_output("v1", config) == tmp_path / "ws" / "reports" / "v1.html"
    result = CliRunner().invoke(app(), ["report", "--config", str(config)])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "ws" / "reports" / f"{versions(store)[1].version_id}.html").is_file()


def run_config(store: Store, workspace: Path) -> dict[str, Any]:
    from vlpref.demo import demo_config

    return {
        **demo_config("http://127.0.0.1:9/v1", workspace.parent),
        "workspace": str(workspace),
        "store": store.location,
    }


def test_the_command_names_a_version_that_is_not_there(store: Store) -> None:
    result = CliRunner().invoke(
        app(), ["report", "20200101T000000.000000Z-00000000", "-s", store.location]
    )
    assert result.exit_code != 0
    assert isinstance(result.exception, StoreError)


# --- the console summary ------------------------------------------------------------------------


def test_the_summary_ends_with_the_report_path(store: Store) -> None:
    first, second = versions(store)
    console = Console(record=True, width=80, file=io.StringIO())
    print_report_path(second, console)
    assert console.export_text().splitlines()[-1] == second.path(REPORT_NAME)
    console = Console(record=True, width=80, file=io.StringIO())
    print_report_path(first, console)
    assert f"vlpref report {first.version_id}" in console.export_text()
