"""The report of a demo-like version, built by a real flow run (the session's Prefect server)
against the simulated server, opened in a real headless Chromium: it renders with no console
error and no failed or outside request, the heatmap and the gallery hold the counts the version's
tables give, the gallery's filters work, and a screenshot is saved (its path is printed).

Chromium is the system package (`apt-get install chromium`, /usr/bin/chromium; another binary
with VLPREF_CHROMIUM=PATH), driven by Python playwright; playwright's own browser download is
never used. Where Chromium is missing the test FAILS, saying how to install it: a report nobody
looked at in a browser is not tested.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from flows.build import build_dataset
from vlpref.demo import SIM_MODELS, demo_config
from vlpref.publish.version import report_link
from vlpref.report_html import REPORT_NAME
from vlpref.report_html.data import GALLERY_MAX, GALLERY_PER_CATEGORY, category
from vlpref.sim.testing import SimServer
from vlpref.store import Store, Version

CHROMIUM = Path(os.environ.get("VLPREF_CHROMIUM", "/usr/bin/chromium"))
# No sandbox: CI runs as root in a container. The rest keeps Chromium from reaching out on its
# own (updates, sync, safe browsing lists), so a request seen is the page's.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"


def chromium() -> Path:
    if not (CHROMIUM.is_file() and os.access(CHROMIUM, os.X_OK)):
        pytest.fail(
            f"Chromium not found at {CHROMIUM}: the report's browser test needs it. Install the "
            "system package (Debian/Ubuntu: `apt-get install chromium`), or set "
            "VLPREF_CHROMIUM to a Chromium binary.",
            pytrace=False,
        )
    return CHROMIUM


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, prefect_server: str) -> Iterator[Version]:
    """Two versions of the demo's config (2 images per branch): the second drops a response
    model, so its report has a parent and a change to show."""
    tmp = tmp_path_factory.mktemp("report-browser")
    path = tmp / "run.yaml"
    with SimServer({"models": SIM_MODELS}) as sim:
        config = demo_config(sim.base_url, tmp, per_branch=2)
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        build_dataset(str(path))
        config["models"] = [m for m in config["models"] if m["name"] != "filtered"]
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        version_id = build_dataset(str(path))
    yield Store(str(tmp / "store")).open(version_id)


def expected_counts(version: Version) -> dict[str, Any]:
    """What the page must show, from the version's tables (not from the report's code)."""
    questions = version.table("questions", ["class1", "class2"])
    categories = {
        category(a, b)
        for a, b in zip(
            questions["class1"].to_pylist(), questions["class2"].to_pylist(), strict=True
        )
    }
    models = set(version.table("responses", ["model"])["model"].to_pylist())
    per_category: Counter[str] = Counter()
    for split in version.splits:
        quads = version.split(split, ["class1", "class2"])
        per_category.update(
            category(a, b)
            for a, b in zip(quads["class1"].to_pylist(), quads["class2"].to_pylist(), strict=True)
        )
    cap = max(1, min(GALLERY_PER_CATEGORY, GALLERY_MAX // len(per_category)))
    return {
        "models": len(models),
        "categories": len(categories),
        "cards": {cat: min(cap, n) for cat, n in per_category.items()},
        "quadruples": sum(per_category.values()),
    }


def test_the_report_is_published_and_linked(built: Version) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    assert REPORT_NAME in built.manifest["files"]
    built.verify()
    link = report_link(built.info)
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["vlpref-report"]))
        )
    mine = [a for a in artifacts if link in str(a.data)]
    assert len(mine) == 1, [a.data for a in artifacts]
    assert mine[0].flow_run_id is not None  # on the flow run that published the version


def test_the_report_in_a_real_browser(built: Version) -> None:
    from playwright.sync_api import sync_playwright

    binary = chromium()
    expected = expected_counts(built)
    url = Path(built.path(REPORT_NAME)).resolve().as_uri()
    errors: list[str] = []
    requests: list[str] = []
    ARTIFACTS.mkdir(exist_ok=True)
    screenshot = ARTIFACTS / "report.png"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(binary), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on(
                "console",
                lambda m: (
                    errors.append(f"console {m.type}: {m.text}") if m.type == "error" else None
                ),
            )
            page.on("pageerror", lambda e: errors.append(f"page error: {e}"))
            page.on("requestfailed", lambda r: errors.append(f"failed load: {r.url} {r.failure}"))
            page.on("request", lambda r: requests.append(r.url))
            page.goto(url, wait_until="load")

            # Nothing but the page itself and its inline data was asked for.
            assert [r for r in requests if r != url and not r.startswith("data:")] == []

            cells = page.locator('#unsafe-heatmap [id^="unsafe-heatcell-"]')
            assert cells.count() == expected["models"] * expected["categories"]
            assert page.locator("#unsafe-table tbody tr").count() == expected["models"]

            cards = page.locator("#gallery-cards .card")
            assert cards.count() == sum(expected["cards"].values())
            assert f"of the version's {expected['quadruples']:,} quadruples" in page.inner_text(
                "#gallery"
            )
            images_ok = page.evaluate(
                "Array.from(document.querySelectorAll('#gallery-cards img'))"
                ".every(i => i.complete && i.naturalWidth > 0)"
            )
            assert images_ok and page.locator("#gallery-cards img").count() == cards.count()
            total = cards.count()
            assert page.inner_text("#gallery-shown") == f"{total} of {total} shown"

            # The filters: a category, then a model, each against the cards' own attributes.
            biggest = max(expected["cards"], key=lambda c: expected["cards"][c])
            page.select_option("#f-category", biggest)
            visible = page.locator("#gallery-cards .card:visible")
            assert visible.count() == expected["cards"][biggest]
            page.select_option("#f-category", "")
            model = page.locator("#f-model option").nth(1).get_attribute("value")
            assert model
            with_model = page.locator(
                f'#gallery-cards .card[data-chosen="{model}"], '
                f'#gallery-cards .card[data-rejected="{model}"]'
            ).count()
            page.select_option("#f-model", model)
            assert 0 < visible.count() == with_model
            assert page.inner_text("#gallery-shown") == f"{with_model} of {total} shown"
            page.select_option("#f-model", "")

            # A parent, and what changed from it.
            assert "models removed: filtered" in page.inner_text("#changes")
            # Nothing wider than the window: wide tables scroll in their own box.
            assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
            page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()
    print(f"\nscreenshot of the report: {screenshot}")
    assert errors == []
    assert screenshot.stat().st_size > 10_000
