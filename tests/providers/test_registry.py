"""Plug-in providers are found through the `vlpref.providers` entry-point group.

The plug-in here is a real installed distribution as far as `importlib.metadata` is concerned: a
module plus a `.dist-info` folder with an `entry_points.txt`, on `sys.path`.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from vlpref.chat import ChatRequest, Message
from vlpref.config import load_config
from vlpref.errors import ConfigError, ProviderError, ProviderNotFound
from vlpref.journal import Journal
from vlpref.providers import available_kinds, create_provider, provider_class
from vlpref.runner import BatchStats, run_all

PLUGIN = """
from collections.abc import AsyncIterator, Iterable, Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict

from vlpref.chat import ChatRequest, ChatResult, Sample
from vlpref.providers import Provider


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: str
    prefix: str = "echo: "


class ShoutProvider(Provider):
    kind = "shout"

    def __init__(self, options: Options) -> None:
        self.options = options

    @classmethod
    def validate_options(cls, options: Mapping[str, Any]) -> None:
        Options.model_validate(dict(options))

    @classmethod
    def from_config(cls, options: Mapping[str, Any]) -> "ShoutProvider":
        return cls(Options.model_validate(dict(options)))

    async def complete(self, requests: Iterable[ChatRequest]) -> AsyncIterator[ChatResult]:
        for request in requests:
            text = self.options.prefix + request.messages[-1].text.upper()
            samples = tuple(Sample(i, text, "stop") for i in range(request.params.n))
            yield ChatResult(request, samples=samples, attempts=1)


class NotAProvider:
    pass
"""


@pytest.fixture
def plugin_on_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    site = tmp_path / "site"
    site.mkdir()
    (site / "shout_plugin.py").write_text(PLUGIN)
    info = site / "shout_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: shout-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        "[vlpref.providers]\n"
        "shout = shout_plugin:ShoutProvider\n"
        "broken = shout_plugin:NotAProvider\n"
    )
    monkeypatch.syspath_prepend(str(site))
    return site


def test_builtin_kind_is_listed() -> None:
    assert "openai" in available_kinds()


def test_unknown_kind_names_the_group() -> None:
    with pytest.raises(ProviderNotFound, match=r"vlpref\.providers"):
        provider_class("nope")


@pytest.mark.usefixtures("plugin_on_path")
async def test_a_plugin_kind_runs_through_the_journal(tmp_path: Path) -> None:
    assert {"shout", "broken"} <= set(available_kinds())
    provider = create_provider("shout", {"kind": "shout", "prefix": ">> "})
    journal = Journal(str(tmp_path / "j"))
    request = ChatRequest(id="1", model="any", messages=(Message.user("hello"),))
    (result,) = await run_all(provider, [request], journal)
    assert result.texts == [">> HELLO"]
    stats = BatchStats()
    await run_all(provider, [request], journal, stats)
    assert stats.cached == 1  # plug-ins get the journal for free
    assert provider.identity == "shout"


@pytest.mark.usefixtures("plugin_on_path")
def test_a_plugin_that_is_not_a_provider_is_refused() -> None:
    with pytest.raises(ProviderError, match="not a subclass of vlpref's Provider"):
        provider_class("broken")


@pytest.mark.usefixtures("plugin_on_path")
def test_configs_validate_plugin_options(tmp_path: Path) -> None:
    config = tmp_path / "run.yaml"
    config.write_text(
        textwrap.dedent(
            """\
            name: p
            taxonomy: t.yaml
            endpoints:
              loud: {kind: shout, prefix: "!", volume: 11}
            models: [{name: a, endpoint: loud, model: m}]
            generator: {name: g, endpoint: loud, model: m}
            judges: [{name: j, endpoint: loud, model: m}]
            """
        )
    )
    with pytest.raises(ConfigError, match=r"endpoints\.loud\.volume: line 4"):
        load_config(config)
    config.write_text(config.read_text().replace(", volume: 11", ""))
    assert load_config(config).endpoint_kind("loud") == "shout"
